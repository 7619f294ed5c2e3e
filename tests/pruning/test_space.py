"""The architecture space: unit discovery, vector layout, random/hard architectures, keep-sets, serialisation."""

from __future__ import annotations

import json

import pytest
import torch

from pruning import ArchitectureSpace, PrunableUnit, UnitKind
from tests.helpers import TEXT_LEN, meta_unet, sd21_like_config, small_unet_config

ALL_KINDS = set(UnitKind)


@pytest.fixture(params=["small", "sd15", "sd21"])
def any_space(request) -> ArchitectureSpace:
    return request.getfixturevalue(f"{request.param}_space")


def _block_of(module_path: str) -> str:
    parts = module_path.split(".")
    return "mid_block" if parts[0] == "mid_block" else ".".join(parts[:2])


# --------------------------------------------------------------------------------------------------------- layout
def test_layout_dim_slices_and_order(any_space):
    space = any_space
    units = list(space)
    assert space.dim == sum(u.num_gates for u in units)
    assert space.width_dim == sum(u.num_gates for u in space.width_units)
    # All width units, then all depth units.
    kinds_are_depth = [u.kind.is_depth for u in units]
    assert kinds_are_depth == sorted(kinds_are_depth)
    assert units == list(space.width_units) + list(space.depth_units)
    # Slices tile [0, dim) contiguously in unit order.
    start = 0
    for unit in units:
        sl = space.slices[unit.name]
        assert (sl.start, sl.stop) == (start, start + unit.num_gates)
        start = sl.stop
    assert start == space.dim
    assert len({u.name for u in units}) == len(units)
    assert all(space[u.name] is u for u in units)
    # unit_index and gates_of agree with the slices.
    index = space.unit_index()
    assert index.shape == (space.dim,)
    arch = torch.arange(space.dim, dtype=torch.float32)
    for i, unit in enumerate(units):
        assert torch.equal(index[space.slices[unit.name]], torch.full((unit.num_gates,), i))
        assert torch.equal(space.gates_of(arch, unit.name), arch[space.slices[unit.name]])
    batch = arch.expand(2, -1)
    assert torch.equal(space.gates_of(batch, units[0].name), batch[:, space.slices[units[0].name]])


def test_all_unit_kinds_present(any_space):
    assert {u.kind for u in any_space} == ALL_KINDS
    for unit in any_space.depth_units:
        assert (unit.num_gates, unit.channels_per_gate, unit.depth_parent) == (1, 0, None)
    for unit in any_space.width_units:
        assert unit.num_gates >= 1 and unit.channels_per_gate >= 1


def test_width_units_sit_in_module_order(small_unet, small_space):
    order = {path: i for i, (path, _) in enumerate(small_unet.named_modules())}
    positions = [order[u.module] for u in small_space.width_units]
    assert positions == sorted(positions)


def test_depth_units_of_small_config(small_space):
    """The last ResNet and the last Transformer2D of every down/up block (the first down block has no attention)."""
    assert [u.name for u in small_space.depth_units] == [
        "resnet_depth:down_blocks.0.resnets.1",
        "resnet_depth:down_blocks.1.resnets.1",
        "transformer_depth:down_blocks.1.attentions.1",
        "resnet_depth:down_blocks.2.resnets.1",
        "transformer_depth:down_blocks.2.attentions.1",
        "resnet_depth:up_blocks.0.resnets.2",
        "transformer_depth:up_blocks.0.attentions.2",
        "resnet_depth:up_blocks.1.resnets.2",
        "transformer_depth:up_blocks.1.attentions.2",
        "resnet_depth:up_blocks.2.resnets.2",
    ]


def test_depth_parents(small_space):
    for unit in small_space.width_units:
        parents = [
            d.name for d in small_space.depth_units if unit.module.startswith(d.module + ".") or unit.module == d.module
        ]
        assert unit.depth_parent == (parents[0] if parents else None), unit.name
    assert small_space["resnet:down_blocks.0.resnets.1"].depth_parent == "resnet_depth:down_blocks.0.resnets.1"
    attn = small_space["attn2:up_blocks.1.attentions.2.transformer_blocks.0.attn2"]
    assert attn.depth_parent == "transformer_depth:up_blocks.1.attentions.2"
    assert all(u.depth_parent is None for u in small_space.width_units if u.block == "mid_block")


def test_down_block_resnet_that_changes_width_is_not_droppable():
    # With one layer per block the last down-block ResNet is the first one: it is droppable only where it keeps
    # the channel count (32 -> 32 and 64 -> 64), not where it widens (32 -> 64). Up blocks still have 2 ResNets.
    space = ArchitectureSpace.from_unet(meta_unet(small_unet_config(layers_per_block=1)))
    names = {u.name for u in space.depth_units}
    assert "resnet_depth:down_blocks.0.resnets.0" in names
    assert "resnet_depth:down_blocks.1.resnets.0" not in names
    assert "resnet_depth:down_blocks.2.resnets.0" in names
    assert {f"resnet_depth:up_blocks.{i}.resnets.1" for i in range(3)} <= names
    assert "resnet_depth:up_blocks.0.resnets.0" not in names


def test_constructor_rejects_depth_before_width(small_space):
    units = list(small_space.depth_units[:1]) + list(small_space.width_units)
    with pytest.raises(ValueError, match="width units"):
        ArchitectureSpace(units, small_space.unet_config)


# ----------------------------------------------------------------------------------------------- unit granularity
@pytest.mark.parametrize("name", ["small", "sd15", "sd21"])
def test_resnet_units_follow_groupnorm_groups(request, name):
    unet, space = request.getfixturevalue(f"{name}_unet"), request.getfixturevalue(f"{name}_space")
    resnets = [u for u in space if u.kind is UnitKind.RESNET]
    assert resnets
    for unit in resnets:
        norm = unet.get_submodule(unit.module).norm2
        assert unit.num_gates == norm.num_groups == unet.config.norm_num_groups
        assert unit.channels_per_gate == norm.num_channels // norm.num_groups


def test_feed_forward_groups_default_and_divisor_fallback(small_unet):
    # Every transformer in the small config has 64 channels: GEGLU inner width 4 * 64 = 256.
    def ff_units(space):
        units = [u for u in space if u.kind is UnitKind.FEED_FORWARD]
        assert units
        for unit in units:
            assert small_unet.get_submodule(unit.module).net[2].in_features == 256
        return {(u.num_gates, u.channels_per_gate) for u in units}

    assert ff_units(ArchitectureSpace.from_unet(small_unet)) == {(32, 8)}
    # 7 does not divide 256: the largest divisor of 256 that is at most 7 is 4.
    assert ff_units(ArchitectureSpace.from_unet(small_unet, feed_forward_groups=7)) == {(4, 64)}
    assert ff_units(ArchitectureSpace.from_unet(small_unet, feed_forward_groups=1000)) == {(256, 1)}
    assert ff_units(ArchitectureSpace.from_unet(small_unet, feed_forward_groups=1)) == {(1, 256)}


def test_attention_head_counts_sd21_list(sd21_space):
    """SD 2.1's `attention_head_dim=[5, 10, 20, 20]` are head COUNTS per down block (reversed for up blocks)."""
    heads = sd21_like_config()["attention_head_dim"]
    channels = sd21_like_config()["block_out_channels"]
    expected = {f"down_blocks.{i}": (heads[i], channels[i]) for i in range(4)}
    expected["mid_block"] = (heads[-1], channels[-1])
    expected |= {f"up_blocks.{i}": (heads[::-1][i], channels[::-1][i]) for i in range(4)}
    attention = [u for u in sd21_space if u.kind in (UnitKind.SELF_ATTENTION, UnitKind.CROSS_ATTENTION)]
    assert {_block_of(u.module) for u in attention} == {
        "down_blocks.0",
        "down_blocks.1",
        "down_blocks.2",
        "mid_block",
        "up_blocks.1",
        "up_blocks.2",
        "up_blocks.3",
    }
    for unit in attention:
        count, width = expected[_block_of(unit.module)]
        assert unit.num_gates == count, unit.name
        assert unit.num_gates * unit.channels_per_gate == width, unit.name


def test_attention_head_counts_sd15_int(sd15_unet, sd15_space):
    """SD 1.5's `attention_head_dim=8` means 8 heads everywhere; the head width follows the block width."""
    attention = [u for u in sd15_space if u.kind in (UnitKind.SELF_ATTENTION, UnitKind.CROSS_ATTENTION)]
    assert attention
    for unit in attention:
        module = sd15_unet.get_submodule(unit.module)
        assert unit.num_gates == 8 == module.heads
        assert unit.channels_per_gate * 8 == module.to_q.out_features


def test_gate_weights_normalise_every_unit(small_space):
    weights = small_space.gate_weights()
    assert weights.shape == (small_space.dim,)
    for unit in small_space:
        norm_sq = weights[small_space.slices[unit.name]].pow(2).sum().item()
        assert norm_sq == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------- random/harden
def test_random_is_deterministic_per_seed(sd21_space):
    a = sd21_space.random(0.5, seed=3)
    assert torch.equal(a, sd21_space.random(0.5, seed=3))
    assert not torch.equal(a, sd21_space.random(0.5, seed=4))
    assert a.shape == (sd21_space.dim,)
    assert set(a.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_random_keep_fraction(sd21_space, keep):
    space = sd21_space
    fractions = [space.random(keep, seed)[: space.width_dim].mean().item() for seed in range(3)]
    # The non-empty guard can only add gates; 1620 gates give a binomial std of about 0.012.
    for fraction in fractions:
        assert keep - 0.05 <= fraction <= keep + 0.06
    for unit in space.width_units:
        assert space.gates_of(space.random(keep, 0), unit.name).sum() >= 1


def test_random_edge_cases(small_space):
    assert torch.equal(small_space.random(1.0, seed=0), small_space.full())
    for keep in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="keep"):
            small_space.random(keep)


def test_harden_thresholds_and_does_not_touch_input(small_space):
    soft = torch.rand(small_space.dim, generator=torch.Generator().manual_seed(0)).requires_grad_()
    before = soft.detach().clone()
    hard = small_space.harden(soft)
    assert not hard.requires_grad
    assert torch.equal(soft.detach(), before)
    assert set(hard.unique().tolist()) <= {0.0, 1.0}
    # Where the guard did not step in, hard == 1[soft >= 0.5].
    guarded = torch.zeros(small_space.dim, dtype=torch.bool)
    for unit in small_space.width_units:
        sl = small_space.slices[unit.name]
        guarded[sl] = (before[sl] < 0.5).all()
    assert torch.equal(hard[~guarded], (before[~guarded] >= 0.5).float())
    assert torch.equal(
        small_space.harden(soft, threshold=0.9)[small_space.width_dim :],
        (before >= 0.9).float()[small_space.width_dim :],
    )


def test_harden_non_empty_guard_keeps_highest_scoring_gate(small_space):
    space = small_space
    scores = 0.4 * torch.rand(space.dim, generator=torch.Generator().manual_seed(1))  # everything below 0.5
    hard = space.harden(scores)
    for unit in space.width_units:
        gates = space.gates_of(hard, unit.name)
        assert gates.sum() == 1, unit.name
        assert gates.argmax() == space.gates_of(scores, unit.name).argmax(), unit.name
    assert hard[space.width_dim :].sum() == 0  # depth units have no guard: dropping a module is allowed
    zero = space.harden(torch.zeros(space.dim))
    for unit in space.width_units:
        assert space.gates_of(zero, unit.name).sum() == 1
    assert zero[space.width_dim :].sum() == 0


def test_harden_batch_applies_guard_per_row(small_space):
    space = small_space
    rows = torch.stack([torch.zeros(space.dim), space.full(), space.random(0.5, 7)])
    hard = space.harden(rows)
    assert hard.shape == (3, space.dim)
    assert torch.equal(hard[0], space.harden(torch.zeros(space.dim)))
    assert torch.equal(hard[1], space.full())
    assert torch.equal(hard[2], space.random(0.5, 7))


# ------------------------------------------------------------------------------------------------------ keep-sets
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_keep_sets_round_trip(small_space, seed):
    arch = small_space.random(0.4, seed)
    keep_sets = small_space.keep_sets(arch)
    assert set(keep_sets) == {u.name for u in small_space}
    for unit in small_space:
        expected = torch.nonzero(small_space.gates_of(arch, unit.name)).flatten().tolist()
        assert keep_sets[unit.name] == expected
    assert torch.equal(small_space.from_keep_sets(keep_sets), arch)
    assert json.loads(json.dumps(keep_sets)) == keep_sets


def test_keep_sets_rejects_a_batch(small_space):
    with pytest.raises(ValueError, match="one architecture"):
        small_space.keep_sets(torch.ones(2, small_space.dim))


def test_from_keep_sets_errors(small_space):
    space = small_space
    good = space.keep_sets(space.full())
    width = space.width_units[0]
    depth = space.depth_units[0]

    missing = {k: v for k, v in good.items() if k != width.name}
    with pytest.raises(ValueError, match="missing"):
        space.from_keep_sets(missing)
    with pytest.raises(ValueError, match="unknown"):
        space.from_keep_sets({**good, "resnet:no.such.module": [0]})
    with pytest.raises(ValueError, match="outside"):
        space.from_keep_sets({**good, width.name: [0, width.num_gates]})
    with pytest.raises(ValueError, match="outside"):
        space.from_keep_sets({**good, width.name: [-1]})
    with pytest.raises(ValueError, match="empty"):
        space.from_keep_sets({**good, width.name: []})
    # A depth unit may be empty (dropped), but not out of range.
    dropped = space.from_keep_sets({**good, depth.name: []})
    assert dropped[space.slices[depth.name]].item() == 0
    with pytest.raises(ValueError, match="outside"):
        space.from_keep_sets({**good, depth.name: [1]})


# -------------------------------------------------------------------------------------------------------- checks
def test_check_rejects_wrong_shapes(small_space):
    dim = small_space.dim
    for bad in (torch.ones(dim + 1), torch.ones(dim - 1), torch.ones(2, 3, dim), torch.tensor(1.0), torch.ones(dim, 2)):
        with pytest.raises(ValueError, match=f"dim={dim}"):
            small_space.check(bad)
    with pytest.raises(ValueError, match=f"dim={dim}"):
        small_space.macs(torch.ones(dim + 1))
    assert isinstance(small_space.check([1.0] * dim), torch.Tensor)
    assert small_space.check(torch.ones(4, dim)).shape == (4, dim)


@pytest.mark.parametrize(
    "extra",
    [
        {"addition_embed_type": "text", "encoder_hid_dim": 48},
        {"class_embed_type": "timestep"},
        {"encoder_hid_dim_type": "text_proj", "encoder_hid_dim": 40},
    ],
    ids=["addition_embed_type", "class_embed_type", "encoder_hid_dim_type"],
)
def test_unsupported_configs_raise(extra):
    unet = meta_unet(small_unet_config(**extra))
    with pytest.raises(ValueError, match="unsupported") as excinfo:
        ArchitectureSpace.from_unet(unet)
    assert next(iter(extra)) in str(excinfo.value)


# ------------------------------------------------------------------------------------------------- serialisation
def test_to_dict_from_dict_round_trip(small_space):
    data = json.loads(json.dumps(small_space.to_dict()))  # must be plain JSON
    assert not any(key.startswith("_") for key in data["unet_config"])
    rebuilt = ArchitectureSpace.from_dict(data)
    assert rebuilt.units == small_space.units
    assert all(isinstance(u, PrunableUnit) and isinstance(u.kind, UnitKind) for u in rebuilt)
    assert (rebuilt.dim, rebuilt.width_dim, rebuilt.text_len) == (small_space.dim, small_space.width_dim, TEXT_LEN)
    assert rebuilt.slices == small_space.slices
    arch = small_space.random(0.5, 0)
    assert rebuilt.keep_sets(arch) == small_space.keep_sets(arch)
    # The config survives well enough to rebuild the same U-Net for costing.
    assert rebuilt.total_macs() == small_space.total_macs()
    assert rebuilt.macs(arch) == small_space.macs(arch)
