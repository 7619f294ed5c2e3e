"""From logits to gates: Gumbel-sigmoid with straight-through hard gates, the nested depth ordering, and the
normalised architecture vector the router compares prompts and codes with."""

from __future__ import annotations

import torch

from pruning.space import ArchitectureSpace

TEMPERATURE = 0.4
OFFSET = 3.0  # sigmoid((l + 3) / 0.4) is about 1 at l = 0: training starts from the full network


def logistic_noise(shape: torch.Size, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """The difference of two Gumbel(0, 1) draws, which is Logistic(0, 1)."""
    u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(device=device, dtype=dtype)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid(
    logits: torch.Tensor,
    temperature: float = TEMPERATURE,
    offset: float = OFFSET,
    noise: bool = True,
    generator: torch.Generator | None = None,
    noise_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft gates `sigmoid((l + s G + b) / T)` and straight-through hard gates `1[soft >= 0.5]` (value hard,
    gradient soft). `noise=False` gives the deterministic inference gates; `noise_scale` s (1 in docs/method.md) lets a
    search anneal the noise towards them. The noise is drawn whatever s is, so a generator's stream does not depend
    on the schedule."""
    if noise:
        draw = logistic_noise(logits.shape, generator, logits.device, logits.dtype)
        logits = logits + noise_scale * draw
    soft = torch.sigmoid((logits + offset) / temperature)
    hard = (soft >= 0.5).to(soft.dtype)
    return soft, hard + (soft - soft.detach())  # grouped so the value is exactly 0 or 1


def depth_order(space: ArchitectureSpace) -> list[int]:
    """Depth units (indices into `space.depth_units`) from outermost (highest resolution) to innermost."""
    n_up = max((int(u.module.split(".")[1]) for u in space.depth_units if u.module.startswith("up")), default=-1)

    def level(i: int) -> tuple[int, int, int]:
        unit = space.depth_units[i]
        index = int(unit.module.split(".")[1])
        down = unit.module.startswith("down")
        # Down block k and up block (n_up - k) sit at the same resolution.
        return (index if down else n_up - index, 0 if down else 1, i)

    return sorted(range(len(space.depth_units)), key=level)


def nested_depth_logits(raw: torch.Tensor, order: list[int], eps: float = 1e-4) -> torch.Tensor:
    """Depth logits whose keep probabilities fall along `order`: softmax, reversed cumulative sum, logit. The first
    unit of the order is (almost) always kept and later ones are dropped first.

    `raw` is `(..., n)` in the space's depth-unit order; the result has the same layout.
    """
    ordered = raw[..., order]
    probs = ordered.softmax(-1)
    keep = probs.flip(-1).cumsum(-1).flip(-1).clamp(eps, 1 - eps)  # (..., n), non-increasing
    nested = torch.logit(keep)
    out = torch.empty_like(nested)
    out[..., order] = nested
    return out


def normalised_architecture(gates: torch.Tensor, space: ArchitectureSpace) -> torch.Tensor:
    """The WDN vector: width gates scaled by their module's depth gate, every gate divided by sqrt(gates in its
    unit) so each unit weighs the same, then L2-normalised. `(..., dim)` -> `(..., dim)`."""
    table_parent = space.parent_index().to(gates.device)
    width = gates[..., : space.width_dim]
    parent = gates[..., table_parent.clamp(min=0)]
    width = width * torch.where(table_parent >= 0, parent, torch.ones_like(parent))
    vector = torch.cat([width, gates[..., space.width_dim :]], dim=-1) * space.gate_weights().to(gates)
    return torch.nn.functional.normalize(vector, dim=-1)
