"""The MAC model against PyTorch's FlopCounterMode, on the full and the sliced models."""

from __future__ import annotations

import pytest
import torch

from pruning import ArchitectureSpace, UnitKind, flop_counter_macs, slice_unet
from tests.helpers import (
    SD_RESOLUTION,
    SMALL_RESOLUTION,
    TEXT_LEN,
    load_unet_config,
    meta_unet,
    sd15_like_config,
    sd21_like_config,
)

# BK-SDM (Kim et al. 2023), Table 1: SD 1.5's U-Net costs 338.7 G MACs per call at 64x64 latents, text length 77,
# counting convolutions and linear layers but not the attention matmuls.
BK_SDM_SD15_MACS = 338.7e9


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def sd15_full_meta():
    """The real SD 1.5 U-Net on the meta device, with its space at text length 77."""
    unet = meta_unet(load_unet_config("sd-1.5"))
    return unet, ArchitectureSpace.from_unet(unet, text_len=77)


@pytest.fixture(scope="module")
def sd21_like_meta():
    unet = meta_unet(sd21_like_config())
    return unet, ArchitectureSpace.from_unet(unet, text_len=TEXT_LEN)


# ---------------------------------------------------------------------------------------------- full model totals
def test_total_macs_small_matches_flop_counter(small_unet, small_space):
    counted = flop_counter_macs(small_unet, SMALL_RESOLUTION, TEXT_LEN)
    assert _rel(small_space.total_macs(SMALL_RESOLUTION), counted) < 0.01
    # A non-square input is costed too.
    counted = flop_counter_macs(small_unet, (16, 24), TEXT_LEN)
    assert _rel(small_space.total_macs((16, 24)), counted) < 0.01


@pytest.mark.parametrize("make_config", [sd15_like_config, sd21_like_config], ids=["sd15_like", "sd21_like"])
def test_total_macs_sd_like_meta_matches_flop_counter(make_config):
    unet = meta_unet(make_config())
    space = ArchitectureSpace.from_unet(unet, text_len=TEXT_LEN)
    assert _rel(space.total_macs(SD_RESOLUTION), flop_counter_macs(unet, SD_RESOLUTION, TEXT_LEN)) < 0.01


def test_total_macs_real_sd15_and_sd21_configs_match_flop_counter(sd15_full_meta):
    unet, space = sd15_full_meta
    assert space.default_resolution == 64
    assert _rel(space.total_macs(), flop_counter_macs(unet, 64, 77)) < 0.01
    unet21 = meta_unet(load_unet_config("sd-2.1"))
    space21 = ArchitectureSpace.from_unet(unet21, text_len=77)
    assert _rel(space21.total_macs(32), flop_counter_macs(unet21, 32, 77)) < 0.01


def test_published_sd15_count(sd15_full_meta):
    """Conv + linear MACs of SD 1.5 at 64x64 / 77 tokens match BK-SDM's published 338.7 G within 1%."""
    _, space = sd15_full_meta
    table = space.mac_table(64)
    assert sum(table.op_macs.values()) == table.total
    assert table.op_macs["attention_matmul"] > 0
    assert _rel(table.total - table.op_macs["attention_matmul"], BK_SDM_SD15_MACS) < 0.01


def test_mac_table_is_cached_per_resolution(small_space):
    assert small_space.mac_table(16) is small_space.mac_table((16, 16))
    assert small_space.mac_table() is small_space.mac_table(small_space.default_resolution)
    assert small_space.total_macs(32) > small_space.total_macs(16)


# ------------------------------------------------------------------------------------------------- sub-networks
def _extreme_archs(space: ArchitectureSpace) -> dict[str, torch.Tensor]:
    no_depth = space.random(0.5, 11)
    no_depth[space.width_dim :] = 0
    return {"minimal": space.harden(torch.zeros(space.dim)), "no_depth": no_depth}


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("seed", [0, 1])
def test_sliced_macs_match_flop_counter_small(small_unet, small_space, keep, seed):
    arch = small_space.random(keep, seed)
    counted = flop_counter_macs(slice_unet(small_unet, small_space, arch), SMALL_RESOLUTION, TEXT_LEN)
    assert _rel(small_space.macs(arch, SMALL_RESOLUTION), counted) < 0.01


@pytest.mark.parametrize("which", ["minimal", "no_depth"])
def test_sliced_macs_match_flop_counter_extremes(small_unet, small_space, which):
    arch = _extreme_archs(small_space)[which]
    counted = flop_counter_macs(slice_unet(small_unet, small_space, arch), SMALL_RESOLUTION, TEXT_LEN)
    assert _rel(small_space.macs(arch, SMALL_RESOLUTION), counted) < 0.01


def test_sliced_macs_match_flop_counter_sd_shaped(sd15_full_meta, sd21_like_meta):
    """Slicing works on the meta device, so the real SD 1.5 U-Net can be sliced and counted for free."""
    unet, space = sd15_full_meta
    arch = space.random(0.5, 3)
    counted = flop_counter_macs(slice_unet(unet, space, arch), 64, 77)
    assert _rel(space.macs(arch, 64), counted) < 0.01

    unet, space = sd21_like_meta
    arch = space.random(0.3, 4)
    counted = flop_counter_macs(slice_unet(unet, space, arch), SD_RESOLUTION, TEXT_LEN)
    assert _rel(space.macs(arch, SD_RESOLUTION), counted) < 0.01


def test_half_keep_is_much_cheaper(small_unet, small_space):
    full_model = small_space.total_macs(SMALL_RESOLUTION)
    full_counted = flop_counter_macs(small_unet, SMALL_RESOLUTION, TEXT_LEN)
    for seed in (0, 1):
        arch = small_space.random(0.5, seed)
        assert full_model >= 1.5 * small_space.macs(arch, SMALL_RESOLUTION)
        sliced = slice_unet(small_unet, small_space, arch)
        assert full_counted >= 1.5 * flop_counter_macs(sliced, SMALL_RESOLUTION, TEXT_LEN)


def test_full_and_minimal_costs(small_space):
    total = small_space.total_macs()
    prunable = small_space.prunable_macs()
    assert 0 < prunable < total
    assert small_space.macs(small_space.full()) == total
    minimal = small_space.macs(torch.zeros(small_space.dim))  # the guard keeps one gate per width unit
    assert total - prunable < minimal < total / 2


# ----------------------------------------------------------------------------------------- differentiable costs
def test_differentiable_macs_matches_macs_on_hard_batch(small_space):
    space = small_space
    archs = torch.stack([space.random(keep, seed) for keep, seed in [(0.3, 0), (0.5, 1), (0.8, 2)]])
    archs = torch.cat([archs, space.full()[None], space.harden(torch.zeros(1, space.dim))])
    expected = torch.tensor([space.macs(a) for a in archs], dtype=torch.float64)
    exact = space.differentiable_macs(archs.double())
    assert exact.shape == (5,)
    assert torch.equal(exact, expected)
    approx = space.differentiable_macs(archs)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx.double(), expected, rtol=1e-6, atol=0)
    single = space.differentiable_macs(archs[1].double())
    assert single.shape == () and single.item() == expected[1].item()


def test_differentiable_macs_gradient_through_straight_through_gates(small_space):
    logits = torch.randn(4, small_space.dim, generator=torch.Generator().manual_seed(0)).requires_grad_()
    soft = torch.sigmoid(logits)
    hard = (soft >= 0.5).float() + soft - soft.detach()
    macs = small_space.differentiable_macs(hard)
    assert torch.allclose(macs.double(), torch.tensor([small_space.macs(h) for h in hard.detach()]).double(), rtol=1e-6)
    macs.sum().backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad != 0).any()
    # Every gate has a non-negative price; a width gate outside any depth unit always has a positive one.
    assert (logits.grad >= 0).all()
    free = torch.tensor([u.depth_parent is None for u in small_space.width_units for _ in range(u.num_gates)])
    assert (logits.grad[:, : small_space.width_dim][:, free] > 0).all()


def test_gate_prices_match_unit_macs(small_space):
    """Dropping one width gate saves its unit's MACs / gates; dropping a depth gate saves the whole module."""
    space = small_space
    table = space.mac_table()
    full = space.macs(space.full())
    for unit in space.width_units:
        if unit.num_gates < 2:
            continue
        arch = space.full()
        arch[space.slices[unit.name].start] = 0
        assert full - space.macs(arch) == pytest.approx(table.unit_macs[unit.name] / unit.num_gates, abs=1), unit.name
    for unit in space.depth_units:
        arch = space.full()
        arch[space.slices[unit.name]] = 0
        saved = full - space.macs(arch)
        inside = sum(table.unit_macs[u.name] for u in space.width_units if u.depth_parent == unit.name)
        assert saved == table.unit_macs[unit.name] >= inside > 0, unit.name
        if unit.kind is UnitKind.TRANSFORMER_DEPTH:  # proj_in/proj_out belong to the module, not to a width unit
            assert table.unit_macs[unit.name] > inside, unit.name


def test_turning_a_gate_off_never_increases_macs(small_space):
    space = small_space
    for seed in (0, 1):
        arch = space.random(0.5, seed)
        base = space.macs(arch)
        on = torch.nonzero(arch).flatten().tolist()
        off = torch.nonzero(arch == 0).flatten().tolist()
        for i in on:
            smaller = arch.clone()
            smaller[i] = 0
            assert space.macs(smaller) <= base, space.units[space.unit_index()[i]].name
        for i in off:
            larger = arch.clone()
            larger[i] = 1
            assert space.macs(larger) >= base, space.units[space.unit_index()[i]].name


# ----------------------------------------------------------------------------------------------------- text length
def test_text_len_changes_cross_attention_only(small_unet):
    long = ArchitectureSpace.from_unet(small_unet, text_len=77)
    short = ArchitectureSpace.from_unet(small_unet, text_len=TEXT_LEN)
    t_long, t_short = long.mac_table(SMALL_RESOLUTION), short.mac_table(SMALL_RESOLUTION)
    assert t_long.fixed == t_short.fixed
    for unit in long:
        if unit.kind is UnitKind.CROSS_ATTENTION:
            assert t_long.unit_macs[unit.name] > t_short.unit_macs[unit.name], unit.name
        elif not unit.kind.is_depth:
            assert t_long.unit_macs[unit.name] == t_short.unit_macs[unit.name], unit.name
    counted_long = flop_counter_macs(small_unet, SMALL_RESOLUTION, 77)
    counted_short = flop_counter_macs(small_unet, SMALL_RESOLUTION, TEXT_LEN)
    assert counted_long > counted_short
    assert _rel(t_long.total, counted_long) < 0.01
    assert _rel(t_short.total, counted_short) < 0.01
    # The difference is all cross-attention (K/V projections and the two matmuls): it must match too.
    assert _rel(t_long.total - t_short.total, counted_long - counted_short) < 0.01
    # And so for a sub-network.
    arch = long.random(0.5, 5)
    sliced = slice_unet(small_unet, long, arch)
    assert (
        _rel(long.macs(arch) - short.macs(arch), flop_counter_macs(sliced, 16, 77) - flop_counter_macs(sliced, 16, 5))
        < 0.01
    )
