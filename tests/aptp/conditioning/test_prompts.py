"""The conditioning object: rows stay together through select, repeat, cat and to."""

from __future__ import annotations

import pytest
import torch

from aptp.conditioning.prompts import Conditioning


def _prompts(batch: int, with_map: bool = True) -> Conditioning:
    generator = torch.Generator().manual_seed(batch)
    mask = torch.zeros(batch, 6, dtype=torch.long)
    for row in range(batch):
        mask[row, : row + 2] = 1
    return Conditioning(
        states=torch.randn(batch, 6, 4, generator=generator),
        mask=mask,
        pooled=torch.randn(batch, 3, generator=generator),
        prompt_map=torch.randn(batch, 2, 3, 3, generator=generator) if with_map else None,
    )


def _same(a: Conditioning, b: Conditioning) -> bool:
    pairs = [(a.states, b.states), (a.mask, b.mask), (a.pooled, b.pooled), (a.prompt_map, b.prompt_map)]
    return all((x is None and y is None) or (x is not None and y is not None and torch.equal(x, y)) for x, y in pairs)


def test_select_keeps_every_field_of_the_chosen_rows_in_order():
    prompts = _prompts(4)
    picked = prompts.select([2, 0])
    assert len(picked) == 2
    assert torch.equal(picked.states, prompts.states[[2, 0]]) and torch.equal(picked.mask, prompts.mask[[2, 0]])
    assert torch.equal(picked.pooled, prompts.pooled[[2, 0]])
    assert torch.equal(picked.prompt_map, prompts.prompt_map[[2, 0]])
    assert _same(prompts.select(1), prompts.select([1])) and _same(prompts.select(slice(1, 3)), prompts.select([1, 2]))
    assert _same(prompts.select(torch.tensor([3])), prompts.select([3]))


def test_repeat_gives_each_prompt_one_row_per_image():
    prompts = _prompts(2)
    repeated = prompts.repeat(3)
    assert len(repeated) == 6
    assert _same(repeated.select([0, 1, 2]), prompts.select([0, 0, 0]))
    assert _same(repeated.select([3, 4, 5]), prompts.select([1, 1, 1]))
    assert prompts.repeat(1) is prompts
    with pytest.raises(ValueError, match="positive"):
        prompts.repeat(0)


def test_cat_joins_rows_and_refuses_rows_that_disagree_on_a_field():
    first, second = _prompts(2), _prompts(3)
    joined = Conditioning.cat([first, second])
    assert len(joined) == 5 and _same(joined.select([0, 1]), first) and _same(joined.select([2, 3, 4]), second)
    assert Conditioning.cat([first]) is first
    plain = Conditioning.cat([_prompts(1, with_map=False), _prompts(2, with_map=False)])
    assert plain.prompt_map is None and len(plain) == 3
    with pytest.raises(ValueError, match="prompt_map is set on some rows and not on others"):
        Conditioning.cat([first, _prompts(1, with_map=False)])
    with pytest.raises(ValueError, match="nothing to concatenate"):
        Conditioning.cat([])


def test_to_casts_floating_fields_and_keeps_the_mask_integer():
    half = _prompts(2).to(dtype=torch.float16)
    assert half.states.dtype == half.pooled.dtype == half.prompt_map.dtype == torch.float16
    assert half.mask.dtype == torch.long


def test_rows_must_agree_in_number():
    with pytest.raises(ValueError, match="mask has 3 rows, states 2"):
        Conditioning(states=torch.zeros(2, 4, 8), mask=torch.ones(3, 4))


def test_what_a_unet_reads_leaves_the_routers_embedding_out():
    prompts = _prompts(2)
    unet = prompts.for_unet()
    assert unet.pooled is None and torch.equal(unet.states, prompts.states) and unet.prompt_map is prompts.prompt_map
    unrouted = Conditioning(
        states=torch.zeros(1, 6, 4), mask=torch.ones(1, 6, dtype=torch.long), prompt_map=torch.zeros(1, 2, 3, 3)
    )
    assert len(Conditioning.cat([unrouted, prompts.for_unet()])) == 3  # an empty prompt beside routed prompts
