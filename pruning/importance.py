"""Importance scores for structured pruning: how much of a unit each width gate carries. The static baseline keeps
the gates of largest L1 norm (the paper's "Norm" pruning) and the search's width floor holds them open."""

from __future__ import annotations

import math

import torch
from torch import nn

from .slicing import group_channels
from .space import ArchitectureSpace, UnitKind, feed_forward_layers


@torch.no_grad()
def l1_importance(unet: nn.Module, space: ArchitectureSpace) -> torch.Tensor:
    """Mean |weight| of everything each width gate keeps or drops, `(width_dim,)`."""
    scores = []
    for unit in space.width_units:
        module = unet.get_submodule(unit.module)
        per_gate = []
        for gate in range(unit.num_gates):
            idx = group_channels([gate], unit.channels_per_gate)
            if unit.kind is UnitKind.RESNET:
                weights = [module.conv1.weight[idx], module.conv2.weight[:, idx]]
            elif unit.kind is UnitKind.FEED_FORWARD:
                proj_path, out_path = feed_forward_layers(module)
                proj, out = module.get_submodule(proj_path), module.get_submodule(out_path)
                rows = torch.cat([idx, idx + out.in_features]) if proj.out_features == 2 * out.in_features else idx
                weights = [proj.weight[rows], out.weight[:, idx]]
            else:
                weights = [module.to_q.weight[idx], module.to_k.weight[idx], module.to_v.weight[idx]]
                weights.append(module.to_out[0].weight[:, idx])
            per_gate.append(torch.cat([w.abs().flatten() for w in weights]).mean())
        scores.append(torch.stack(per_gate))
    return torch.cat(scores)


def l1_architecture(space: ArchitectureSpace, importance: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the `keep` fraction (rounded, at least one) of each width unit's gates with the largest L1 norm; depth
    is not pruned."""
    arch = torch.ones(space.dim)
    for unit in space.width_units:
        sl = space.slices[unit.name]
        count = max(1, round(keep * unit.num_gates))
        kept = importance[sl].topk(count).indices
        gates = torch.zeros(unit.num_gates)
        gates[kept] = 1.0
        arch[sl] = gates
    return arch


def width_floor_cost(space: ArchitectureSpace, min_width: float, resolution: int) -> float:
    """MACs (x the teacher's) of the cheapest network that keeps max(1, ceil(`min_width` x gates)) gates of each width
    unit, and every block: the least an architecture can cost under the search's width floor `min_width` without
    dropping blocks, and, at 0, under L1 pruning. Which gates a unit keeps does not change the cost (its gates are
    equal slices of one layer), so no weights are needed."""
    arch = torch.zeros(space.dim)
    for unit in space.width_units:
        start = space.slices[unit.name].start
        arch[start : start + max(1, math.ceil(min_width * unit.num_gates))] = 1.0
    arch[space.width_dim :] = 1.0
    return space.macs(arch, resolution) / space.total_macs(resolution)


def l1_floor(space: ArchitectureSpace, resolution: int) -> float:
    """MACs (x the teacher's) of the cheapest L1 architecture: one gate in each width unit, depth unpruned."""
    return width_floor_cost(space, 0.0, resolution)


def check_l1_budget(space: ArchitectureSpace, budget: float, resolution: int) -> float:
    """[`l1_floor`], after refusing a `budget` under it: every width unit keeps at least one gate, so no L1
    architecture costs less, and answering with the floor's network would give a cost other than the one asked for."""
    floor = l1_floor(space, resolution)
    if budget < floor:
        raise ValueError(
            f"{budget} is below {floor:.4f} of the teacher's MACs, the cheapest network L1 pruning leaves "
            f"(one gate in each of the {len(space.width_units)} width units, depth unpruned)"
        )
    return floor


def l1_architecture_for_budget(
    unet: nn.Module, space: ArchitectureSpace, budget: float, resolution: int, iterations: int = 30
) -> torch.Tensor:
    """The uniform keep ratio whose L1 architecture costs at most `budget` x the teacher's MACs (bisection); a budget
    under [`l1_floor`] is refused ([`check_l1_budget`])."""
    check_l1_budget(space, budget, resolution)
    importance = l1_importance(unet, space)
    target = budget * space.total_macs(resolution)
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if space.macs(l1_architecture(space, importance, mid), resolution) <= target:
            low = mid
        else:
            high = mid
    return l1_architecture(space, importance, low)
