"""Reading a scene's layout back from a prompt's token states: the auxiliary loss that teaches the teacher's text
adapter which attributes belong to which object, and the probe that measures it (`benchmarks/binding.py`).

A U-Net pixel finds what to draw by one cross-attention read over the prompt's tokens. `PromptLayoutHead` does the
same with one learned query per grid cell (and one for the whole image): a single-head attention read, then
classifiers for the domain's labels (`training.data.labels.HEADS`). Trained on the adapter's output, its loss asks
the adapter to put "a blue square at the top left" where such a read finds it, which the frozen sentence encoder's
states do not (benchmarks/binding.py: about chance per cell).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .data.labels import HEADS, IGNORE, PER_CELL_HEADS
from .data.shapes import CELLS

SCENE_HEADS = tuple(name for name in HEADS if name not in PER_CELL_HEADS)


class AttentionRead(nn.Module):
    """`queries` learned queries, each reading the tokens once (single head, padding masked): `(B, L, D)` ->
    `(B, queries, width)`."""

    def __init__(self, token_dim: int, queries: int, width: int):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.1)
        self.key = nn.Linear(token_dim, width)
        self.value = nn.Linear(token_dim, width)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = torch.einsum("qd,bld->bql", self.queries, self.key(tokens)) / self.queries.shape[-1] ** 0.5
        weights = scores.masked_fill(~mask.bool()[:, None, :], float("-inf")).softmax(-1)
        return torch.einsum("bql,bld->bqd", weights, self.value(tokens))


class PromptLayoutHead(nn.Module):
    """One read per grid cell (shape, colour, size of the object there) and one for the scene (background, glyph,
    glyph colour); logits by head name, per-cell ones `(B, cells, classes)`."""

    def __init__(self, token_dim: int, width: int = 128):
        super().__init__()
        self.read = AttentionRead(token_dim, len(CELLS) + 1, width)
        self.heads = nn.ModuleDict({name: nn.Linear(width, classes) for name, classes in HEADS.items()})

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        read = self.read(tokens, mask)
        cells, scene = read[:, : len(CELLS)], read[:, len(CELLS)]
        return {name: head(cells if name in PER_CELL_HEADS else scene) for name, head in self.heads.items()}


def layout_loss(
    logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor], rows: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy summed over the heads, on the prompts `rows` (a boolean mask: dropped, empty prompts describe
    nothing); and the accuracy of each head where it has a label (per-cell heads: occupied cells only)."""
    loss = torch.zeros((), device=rows.device)
    accuracy = {}
    for name, head_logits in logits.items():
        target = targets[name].to(head_logits.device)[rows]
        predicted = head_logits[rows]
        if name in PER_CELL_HEADS:
            predicted, target = predicted.flatten(0, 1), target.flatten()
        if not (target != IGNORE).any():
            continue  # e.g. no object's colour in a batch of glyphs (cross-entropy over nothing is NaN)
        loss = loss + F.cross_entropy(predicted, target, ignore_index=IGNORE)
        labelled = (target != IGNORE) & ((target > 0) if name == "cell_shape" else True)  # occupied cells
        if labelled.any():
            accuracy[name] = (predicted.argmax(-1) == target)[labelled].float().mean().item()
    return loss, accuracy
