"""L1-norm importance: the static baseline's ranking of each unit's gates (and the search's width floor)."""

from __future__ import annotations

import torch

from pruning.importance import l1_architecture, l1_architecture_for_budget, l1_importance


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
