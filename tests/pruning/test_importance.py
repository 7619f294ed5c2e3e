"""L1-norm importance: the static baseline's ranking of each unit's gates (and the search's width floor)."""

from __future__ import annotations

import pytest
import torch

from pruning.importance import l1_architecture, l1_architecture_for_budget, l1_floor, l1_importance, width_floor_cost


def test_l1_architecture_keeps_the_largest_gates_of_every_unit(small_unet, small_space):
    space = small_space
    importance = l1_importance(small_unet, space)
    assert importance.shape == (space.width_dim,)
    arch = l1_architecture(space, importance, 0.5)
    assert torch.equal(arch[space.width_dim :], torch.ones(len(space.depth_units)))  # depth is not pruned
    for unit in space.width_units:
        sl = space.slices[unit.name]
        kept, scores = arch[sl].bool(), importance[sl]
        assert int(kept.sum()) == max(1, round(0.5 * unit.num_gates))
        if not kept.all():
            assert scores[kept].min() >= scores[~kept].max(), unit.name


def test_the_budgeted_architecture_spends_at_most_the_budget(small_unet, small_space):
    resolution = small_space.default_resolution
    total = small_space.total_macs(resolution)
    arch = l1_architecture_for_budget(small_unet, small_space, 0.6, resolution)
    spent = small_space.macs(arch, resolution) / total
    assert 0.5 < spent <= 0.6


def test_a_budget_under_the_one_gate_a_unit_floor_is_refused_naming_the_floor(small_unet, small_space):
    """Every width unit keeps a gate; below that network's cost no L1 architecture meets the budget, and answering
    with the floor's network would hand back a cost other than the one asked for (the sweep's 0.2 job got 0.279)."""
    resolution = small_space.default_resolution
    one_gate_each = l1_architecture(small_space, l1_importance(small_unet, small_space), 0.0)
    floor = small_space.macs(one_gate_each, resolution) / small_space.total_macs(resolution)
    assert all(one_gate_each[small_space.slices[u.name]].sum() == 1 for u in small_space.width_units)
    assert torch.equal(l1_architecture_for_budget(small_unet, small_space, floor, resolution), one_gate_each)
    with pytest.raises(ValueError, match=rf"^{floor / 2} is below {floor:.4f} of the teacher's MACs.*one gate in each"):
        l1_architecture_for_budget(small_unet, small_space, floor / 2, resolution)


@pytest.mark.parametrize("min_width", [0.25, 0.5])
def test_the_width_floor_costs_the_same_whichever_gates_it_holds(small_unet, small_space, min_width):
    """The floor's cost is computed from positions alone (no weights: `aptp train search --dry-run` states it); it is
    what the search's floor, the strongest gates of each unit by L1 norm, does cost."""
    from training.search import width_floor

    resolution = small_space.default_resolution
    held = torch.zeros(small_space.dim)
    held[width_floor(small_unet, small_space, min_width)] = 1.0
    held[small_space.width_dim :] = 1.0
    cost = small_space.macs(held, resolution) / small_space.total_macs(resolution)
    assert width_floor_cost(small_space, min_width, resolution) == pytest.approx(cost, rel=1e-9)
    assert l1_floor(small_space, resolution) < cost
