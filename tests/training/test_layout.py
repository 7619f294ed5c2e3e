"""The layout read-out: what a single attention read per cell can learn from a prompt's token states, and a loss
that stays finite on any batch."""

from __future__ import annotations

import math

import torch

from aptp.conditioning.prompts import Conditioning
from training.data.labels import HEADS, IGNORE, collate
from training.data.shapes import CELLS, ShapesDomain
from training.layout import LAYOUT_READS, PromptLayoutHead, layout_loss


def _batch(count: int, start: int = 0):
    samples = ShapesDomain(seed=0, split="train").batch(start, count)
    return samples, collate(samples)[1]


def test_logits_have_one_row_per_cell_and_one_per_scene():
    head = PromptLayoutHead(token_dim=12, width=8)
    tokens, mask = torch.randn(3, 5, 12), torch.ones(3, 5, dtype=torch.long)
    logits = head(Conditioning(tokens, mask))
    assert logits.keys() == HEADS.keys()
    assert logits["cell_colour"].shape == (3, len(CELLS), HEADS["cell_colour"])
    assert logits["glyph"].shape == (3, HEADS["glyph"])


def test_padding_is_not_read():
    torch.manual_seed(0)
    head = PromptLayoutHead(token_dim=12, width=8)
    tokens, mask = torch.randn(1, 6, 12), torch.tensor([[1, 1, 1, 0, 0, 0]])
    garbage = tokens.clone()
    garbage[0, 3:] = 50.0
    for name, value in head(Conditioning(tokens, mask)).items():
        torch.testing.assert_close(head(Conditioning(garbage, mask))[name], value)


def test_loss_skips_dropped_prompts_and_heads_without_labels():
    samples, targets = _batch(16)
    head = PromptLayoutHead(token_dim=12, width=8)
    logits = head(Conditioning(torch.randn(16, 5, 12), torch.ones(16, 5, dtype=torch.long)))
    everything, accuracy = layout_loss(logits, targets, torch.ones(16, dtype=torch.bool))
    assert math.isfinite(everything.item()) and everything.item() > 0
    assert set(accuracy) <= set(HEADS)
    glyphs = torch.tensor([s.scene.glyph is not None for s in samples])
    assert glyphs.any() and (~glyphs).any()
    only_glyphs, accuracy = layout_loss(logits, targets, glyphs)  # no object colour or size anywhere
    assert math.isfinite(only_glyphs.item()) and "cell_colour" not in accuracy and "glyph_colour" in accuracy
    none, accuracy = layout_loss(logits, targets, torch.zeros(16, dtype=torch.bool))
    assert none.item() == 0 and accuracy == {}
    assert (targets["cell_colour"] == IGNORE).any()


def test_the_read_out_learns_where_things_are_from_token_states():
    """Fed tokens that state each cell's shape in a fixed slot, a few hundred steps of the read-out find it: the
    loss can teach what it measures."""
    torch.manual_seed(0)
    samples, targets = _batch(256)
    shapes = HEADS["cell_shape"]
    tokens = torch.zeros(256, len(CELLS), len(CELLS) + shapes)
    tokens[:, :, : len(CELLS)] = torch.eye(len(CELLS))  # token i says "I am cell i"
    tokens[:, :, len(CELLS) :] = torch.nn.functional.one_hot(targets["cell_shape"], shapes).float()  # ... and its shape
    mask = torch.ones(256, len(CELLS), dtype=torch.long)
    head = PromptLayoutHead(token_dim=len(CELLS) + shapes, width=32)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    rows = torch.ones(256, dtype=torch.bool)
    for _ in range(300):
        loss, accuracy = layout_loss(head(Conditioning(tokens, mask)), targets, rows)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert accuracy["cell_shape"] > 0.9


def test_with_summary_tokens_the_head_classifies_the_adapters_last_tokens():
    """The read-out of a summarising adapter is its summary tokens themselves: the loss must reach them, and only
    them, so what the U-Net reads is what was taught."""
    torch.manual_seed(0)
    head = PromptLayoutHead(token_dim=12, summary=True)
    tokens = torch.randn(2, 7 + LAYOUT_READS, 12, requires_grad=True)
    mask = torch.ones(2, 7 + LAYOUT_READS, dtype=torch.long)
    logits = head(Conditioning(tokens, mask))
    assert logits["cell_shape"].shape == (2, len(CELLS), HEADS["cell_shape"])
    sum(value.sum() for value in logits.values()).backward()
    reached = tokens.grad.abs().sum(dim=(0, 2)) > 0
    assert not reached[:7].any() and reached[7:].all()
