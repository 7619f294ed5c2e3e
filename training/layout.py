"""Reading a scene's layout back from a prompt's token states: the auxiliary loss that teaches the teacher's text
adapter which attributes belong to which object, and the probe that measures it (`benchmarks/binding.py`).

A U-Net pixel finds what to draw by one cross-attention read over the prompt's tokens. `PromptLayoutHead` does the
same with one learned query per grid cell (and one for the whole image): a single-head attention read, then
classifiers for the domain's labels (`training.data.labels.HEADS`). Trained on the adapter's output, its loss asks
the adapter to put "a blue square at the top left" where such a read finds it, which the frozen sentence encoder's
states do not (benchmarks/binding.py: about chance per cell).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aptp.conditioning.adapter import AttentionRead
from aptp.conditioning.encoder import PromptEncoder
from aptp.conditioning.prompts import Conditioning

from .data.labels import HEADS, IGNORE, PER_CELL_HEADS, collate
from .data.shapes import CELLS, ShapesDomain

LAYOUT_READS = len(CELLS) + 1  # one per grid cell, one for the scene


class PromptLayoutHead(nn.Module):
    """One read per grid cell (shape, colour, size of the object there) and one for the scene (background, glyph,
    glyph colour); logits by head name, per-cell ones `(B, cells, classes)`. It reads the last `token_dim` channels
    of each token state: the adapter's own, also when the adapter passes the encoder's states through before them.

    With `summary`, the adapter's last `LAYOUT_READS` tokens (its summary tokens) are the reads, classified as they
    are: the loss then teaches those tokens, which the U-Net reads, to hold each cell's object. Otherwise the head
    makes its own reads (`AttentionRead`, `width` wide) over the adapter's states."""

    def __init__(self, token_dim: int, width: int = 128, summary: bool = False):
        super().__init__()
        self.token_dim = token_dim
        self.read = None if summary else AttentionRead(token_dim, LAYOUT_READS, width)
        read_dim = token_dim if summary else width
        self.heads = nn.ModuleDict({name: nn.Linear(read_dim, classes) for name, classes in HEADS.items()})

    def forward(self, prompts: Conditioning) -> dict[str, torch.Tensor]:
        tokens = prompts.states[..., -self.token_dim :]
        read = tokens[:, -LAYOUT_READS:] if self.read is None else self.read(tokens, prompts.mask)
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


def pretrain_adapter(
    adapter: nn.Module,
    head: PromptLayoutHead,
    encoder: PromptEncoder,
    domain: ShapesDomain,
    steps: int,
    captions: int,
    batch_size: int,
    lr: float,
    seed: int,
    log: Callable[[dict[str, Any]], None],
) -> dict[str, float]:
    """Train the text adapter and the read-out on the layout loss alone, before the U-Net reads the adapter: trained
    from scratch together with the U-Net, the adapter learns binding far too slowly (at step 2000 of 6000 its
    per-cell read on unseen three-object captions was still at the frozen encoder's level, about 50%). A fixed pool
    of `captions` training captions is encoded once; each step draws `batch_size` of them. `log(record)` receives
    the loss and accuracies every 100 steps. Returns the read-out's accuracy per head on unseen multi-object
    (tier 3) captions of the test split."""
    device = next(adapter.parameters()).device
    samples = domain.batch(0, captions)
    _, targets = collate(samples)
    encoded = [encoder.encode([s.caption for s in samples[i : i + 512]]) for i in range(0, captions, 512)]
    encoded = Conditioning.cat(encoded)
    parameters = list(adapter.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    adapter.train()
    every = torch.ones(batch_size, dtype=torch.bool, device=device)
    for step in range(steps):
        rows = torch.randint(captions, (batch_size,), generator=generator)
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100)
        adapted = adapter(encoded.select(rows).to(device))
        batch_targets = {name: value[rows] for name, value in targets.items()}
        loss, accuracy = layout_loss(head(adapted), batch_targets, every)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log({"pretrain_step": step, "layout": round(loss.item(), 4), "layout_accuracy": rounded_accuracy(accuracy)})
    return layout_accuracy_on_unseen(adapter, head, encoder, tier=3)


@torch.no_grad()
def layout_accuracy_on_unseen(
    adapter: nn.Module, head: PromptLayoutHead, encoder: PromptEncoder, tier: int, count: int = 512
) -> dict[str, float]:
    """The read-out's accuracy per head on the first `count` tier-`tier` captions of the test split."""
    samples = [s for s in ShapesDomain(seed=7, split="test").batch(0, 8 * count) if s.scene.tier == tier][:count]
    _, targets = collate(samples)
    encoded = encoder.encode([s.caption for s in samples])
    was_training = adapter.training
    adapter.eval()
    adapted = adapter(encoded)
    adapter.train(was_training)
    rows = torch.ones(len(samples), dtype=torch.bool, device=adapted.states.device)
    return rounded_accuracy(layout_loss(head(adapted), targets, rows)[1])


def rounded_accuracy(accuracy: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in accuracy.items()}
