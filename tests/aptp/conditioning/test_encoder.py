"""The frozen prompt encoder: length-bucketed padding changes cost, not results."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ENCODER_MAX_LENGTH

PROMPTS = [
    "a red circle",
    "",
    "three small crosses: a blue one in the top left corner, a green one right in the middle of the picture, "
    "and a yellow one at the bottom right corner, all of them on a plain light grey background",
    "the letter K in green on a white background",
]


def test_a_prompt_encodes_the_same_alone_or_in_any_batch(prompt_encoder):
    together = prompt_encoder.encode(PROMPTS)
    for row, prompt in enumerate(PROMPTS):
        alone = prompt_encoder.encode([prompt])
        assert torch.equal(alone.mask[0], together.mask[row])  # same padded length whatever the batch
        # Only float rounding of differently sized matrix products remains.
        torch.testing.assert_close(alone.states[0], together.states[row], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(alone.pooled[0], together.pooled[row], atol=1e-5, rtol=1e-5)


def test_real_tokens_match_full_length_padding(prompt_encoder):
    encoded = prompt_encoder.encode(PROMPTS)
    full = prompt_encoder.tokenizer(
        PROMPTS, padding="max_length", truncation=True, max_length=ENCODER_MAX_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        reference = prompt_encoder.model(**full).last_hidden_state
    assert torch.equal(encoded.mask, full["attention_mask"])
    real = encoded.mask.bool()
    torch.testing.assert_close(encoded.states[real], reference[real], atol=1e-4, rtol=1e-4)


def test_shapes_mask_and_pooling(prompt_encoder):
    encoded = prompt_encoder.encode(PROMPTS)
    assert encoded.states.shape == (len(PROMPTS), ENCODER_MAX_LENGTH, prompt_encoder.token_dim)
    assert encoded.mask[1].sum() == 2  # the empty prompt is [CLS] [SEP]
    assert encoded.mask[2].sum() == ENCODER_MAX_LENGTH  # truncated to max_length
    for row in range(len(PROMPTS)):
        length = int(encoded.mask[row].sum())
        torch.testing.assert_close(encoded.pooled[row], encoded.states[row, :length].mean(0))
        width = -(-length // 8) * 8
        assert torch.count_nonzero(encoded.states[row, width:]) == 0  # nothing computed past the length bucket


def test_extra_layers_are_concatenated_and_the_sentence_embedding_stays(prompt_encoder):
    from aptp.conditioning.encoder import EncoderConfig, PromptEncoder

    both = PromptEncoder(EncoderConfig(max_length=ENCODER_MAX_LENGTH, layers=[0, -1]))
    assert both.token_dim == 2 * prompt_encoder.token_dim and both.embed_dim == prompt_encoder.embed_dim
    last, combined = prompt_encoder.encode(PROMPTS), both.encode(PROMPTS)
    hidden = prompt_encoder.embed_dim
    torch.testing.assert_close(combined.states[..., hidden:], last.states)
    torch.testing.assert_close(combined.pooled, last.pooled)
    first = prompt_encoder.tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        embeddings = prompt_encoder.model(**first, output_hidden_states=True).hidden_states[0][0]
    torch.testing.assert_close(combined.states[0, : embeddings.shape[0], :hidden], embeddings)


def test_a_layer_the_model_does_not_have_is_refused():
    from aptp.conditioning.encoder import EncoderConfig, PromptEncoder

    with pytest.raises(ValueError, match="layers"):
        PromptEncoder(EncoderConfig(layers=[7]))


# ---------------------------------------------------------------------------------------------------- conditioner
def test_conditioner_adapts_token_states_and_keeps_the_routers_embedding(prompt_encoder):
    from aptp.conditioning.adapter import TextAdapter, TextAdapterConfig
    from aptp.conditioning.conditioner import Conditioner

    torch.manual_seed(0)
    adapter = TextAdapter(TextAdapterConfig(token_dim=prompt_encoder.token_dim, width=32, layers=1, heads=4))
    conditioner = Conditioner(prompt_encoder, adapter)
    prompts = ["a red circle in the top left and a blue square", "a green 7"]
    plain, adapted = prompt_encoder.encode(prompts), conditioner.encode(prompts)
    assert conditioner.token_dim == 32 and adapted.states.shape == (2, plain.states.shape[1], 32)
    torch.testing.assert_close(adapted.pooled, plain.pooled)
    torch.testing.assert_close(adapted.mask, plain.mask)
    assert not adapted.states[plain.mask == 0].any()  # zero at padding, like the encoder's own states
    alone = conditioner.encode(prompts[1:])
    torch.testing.assert_close(alone.states[0], adapted.states[1], atol=1e-5, rtol=1e-4)
    assert Conditioner(prompt_encoder).encode(prompts).states.equal(plain.states)


def test_conditioner_refuses_an_adapter_for_other_token_states(prompt_encoder):
    from aptp.conditioning.adapter import TextAdapter, TextAdapterConfig
    from aptp.conditioning.conditioner import Conditioner

    adapter = TextAdapter(TextAdapterConfig(token_dim=prompt_encoder.token_dim + 1, width=16, heads=4))
    with pytest.raises(ValueError, match=f"{prompt_encoder.token_dim + 1}-wide"):
        Conditioner(prompt_encoder, adapter)
