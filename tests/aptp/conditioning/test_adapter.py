"""The teacher's text adapter: batch- and padding-invariant, its MACs counted, saved and loaded with safetensors."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from aptp.conditioning.adapter import ADAPTER_WEIGHTS, TextAdapter, TextAdapterConfig
from aptp.conditioning.prompts import Conditioning
from aptp.formats.files import ModelFileError


@pytest.fixture
def adapter():
    torch.manual_seed(0)
    return TextAdapter(TextAdapterConfig(token_dim=24, width=16, layers=2, heads=4)).eval()


@pytest.fixture
def summarising():
    torch.manual_seed(0)
    config = TextAdapterConfig(token_dim=24, width=16, layers=2, heads=4, passthrough=True, summary_tokens=3)
    return TextAdapter(config).eval()


@pytest.fixture
def mapping():
    """Summary tokens, the first four of which make a 2x2 prompt map of 3 channels."""
    torch.manual_seed(0)
    config = TextAdapterConfig(
        token_dim=24, width=16, layers=2, heads=4, passthrough=True, summary_tokens=5, map_grid=2, map_channels=3
    )
    return TextAdapter(config).eval()


def _prompts(lengths: list[int], padded_to: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randn(len(lengths), padded_to, 24, generator=generator)
    mask = torch.zeros(len(lengths), padded_to, dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return tokens, mask


@torch.no_grad()
@pytest.mark.parametrize("which", ["adapter", "summarising", "mapping"])
def test_a_prompts_states_do_not_depend_on_its_batch_or_its_padding(which, request):
    adapter = request.getfixturevalue(which)
    summary = adapter.config.summary_tokens

    def states(tokens, mask):  # the prompt's first 5 positions, then the summary tokens, then its map
        adapted = adapter(Conditioning(tokens, mask))
        out, _, prompt_map = adapted.states, adapted.mask, adapted.prompt_map
        maps = [] if prompt_map is None else [prompt_map.flatten(1).unsqueeze(-1).expand(-1, -1, out.shape[-1])]
        return torch.cat([out[:, :5], out[:, out.shape[1] - summary :], *maps], dim=1)

    tokens, mask = _prompts([5, 9, 3], padded_to=12)
    together = adapter(Conditioning(tokens, mask))
    alone = adapter(Conditioning(tokens[1:2], mask[1:2]))
    torch.testing.assert_close(together.states[1:2], alone.states, atol=1e-5, rtol=1e-5)
    if together.prompt_map is not None:
        torch.testing.assert_close(together.prompt_map[1:2], alone.prompt_map, atol=1e-5, rtol=1e-5)
    garbage = tokens.clone()
    garbage[0, 5:] = 100.0  # whatever sits in the padding
    torch.testing.assert_close(states(garbage[:1], mask[:1]), states(tokens[:1], mask[:1]), atol=1e-5, rtol=1e-5)
    shorter = states(tokens[:1, :8], mask[:1, :8])  # padded to 8 instead of 12
    torch.testing.assert_close(shorter, states(tokens[:1], mask[:1]), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_summary_tokens_follow_the_prompts_and_are_always_read(summarising):
    tokens, mask = _prompts([5, 9], padded_to=12)
    adapted = summarising(Conditioning(tokens, mask))
    out, out_mask, prompt_map = adapted.states, adapted.mask, adapted.prompt_map
    assert prompt_map is None
    assert out.shape == (2, 12 + 3, 24 + 16) and summarising.context_length(12) == 15
    torch.testing.assert_close(out[:, :12, :24], tokens)  # the prompt's own states pass through
    assert (out[:, 12:, :24] == 0).all()  # a summary token has no encoder state
    torch.testing.assert_close(out_mask, torch.cat([mask, torch.ones(2, 3, dtype=mask.dtype)], dim=1))
    assert not torch.allclose(out[0, 12:], out[1, 12:])  # what a summary token holds depends on the prompt


@torch.no_grad()
def test_the_prompt_map_is_made_of_the_first_summary_tokens(mapping):
    tokens, mask = _prompts([5, 9], padded_to=12)
    out = mapping(Conditioning(tokens, mask))
    assert out.prompt_map.shape == (2, 3, 2, 2)
    assert not torch.allclose(out.prompt_map[0], out.prompt_map[1])  # it says something about the prompt
    # Cell (row, col) of the map is summary token 2 * row + col, projected: a map read off the U-Net's own
    # tokens, so the layout loss that shapes those tokens shapes the map too.
    summary = out.states[:, 12:16, 24:]
    expected = mapping.map(summary).transpose(1, 2).reshape(2, 3, 2, 2)
    torch.testing.assert_close(out.prompt_map, expected)


def test_a_prompt_map_needs_enough_summary_tokens_and_a_channel_count():
    with pytest.raises(ValueError, match="a 3x3 prompt map needs 9 summary tokens, summary_tokens is 5"):
        TextAdapterConfig(token_dim=24, summary_tokens=5, map_grid=3, map_channels=4)
    with pytest.raises(ValueError, match=r"map_grid \(2\) and map_channels \(0\) go together"):
        TextAdapterConfig(token_dim=24, summary_tokens=5, map_grid=2)


@pytest.mark.parametrize("which", ["adapter", "summarising", "mapping"])
def test_macs_match_a_flop_count(which, request):
    adapter = request.getfixturevalue(which)
    tokens, mask = _prompts([10], padded_to=10)
    with FlopCounterMode(display=False) as counter:
        adapter(Conditioning(tokens, mask))
    # The counter does not see the fused attention kernel: the two token-by-token products (scores, then the
    # weighted sum of values) of each layer are added by hand.
    attention = adapter.config.layers * 2 * 10 * 10 * adapter.config.width
    assert counter.get_total_flops() / 2 + attention == adapter.macs(10)


def test_save_and_load_round_trip_and_refuse_a_damaged_file(adapter, tmp_path):
    hashes = adapter.save(tmp_path / "adapter")
    loaded = TextAdapter.load(tmp_path / "adapter", sha256=hashes[ADAPTER_WEIGHTS])
    tokens, mask = _prompts([4, 7], padded_to=7)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(Conditioning(tokens, mask)).states, adapter(Conditioning(tokens, mask)).states
        )
    assert not any(p.requires_grad for p in loaded.parameters())
    (tmp_path / "adapter" / ADAPTER_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(ModelFileError, match=ADAPTER_WEIGHTS):
        TextAdapter.load(tmp_path / "adapter", sha256=hashes[ADAPTER_WEIGHTS])


def test_a_width_that_heads_do_not_divide_is_refused():
    with pytest.raises(ValueError, match="width 30 is not a multiple of heads 4"):
        TextAdapter(TextAdapterConfig(token_dim=8, width=30, heads=4))


@torch.no_grad()
def test_passthrough_keeps_the_encoders_states_before_the_adapters(adapter):
    torch.manual_seed(0)
    config = adapter.config.model_copy(update={"passthrough": True})
    both = TextAdapter(config).eval()
    both.load_state_dict(adapter.state_dict())
    tokens, mask = _prompts([5, 9], padded_to=12)
    adapted = both(Conditioning(tokens, mask))
    out, out_mask, _ = adapted.states, adapted.mask, adapted.prompt_map
    assert config.out_dim == 24 + 16 and out.shape == (2, 12, config.out_dim)
    torch.testing.assert_close(out[..., :24], tokens)
    torch.testing.assert_close(out[..., 24:], adapter(Conditioning(tokens, mask)).states)
    assert out_mask is mask
    assert both.macs(12) == adapter.macs(12)  # the concatenation costs no multiply-accumulates
