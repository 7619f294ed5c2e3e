"""Gated forward and physical slicing compute the same function; the hooks and the surgery behave."""

from __future__ import annotations

import pytest
import torch

from pruning import ArchitectureSpace, UNetGates, UnitKind, apply_gates, slice_unet
from pruning.slicing import ResnetPassThrough, TransformerPassThrough
from tests.helpers import (
    SD_RESOLUTION,
    SMALL_RESOLUTION,
    assert_same_output,
    build_unet,
    run,
    small_unet_config,
    unet_inputs,
)


def _gated(unet, space, gates, inputs):
    with apply_gates(unet, space, gates):
        return run(unet, inputs)


def _with_depth(arch: torch.Tensor, space, value: float) -> torch.Tensor:
    arch = arch.clone()
    arch[space.width_dim :] = value
    return arch


def _hook_count(unet) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


@pytest.fixture(scope="module")
def small_inputs(small_unet):
    return unet_inputs(small_unet, batch=3, resolution=SMALL_RESOLUTION, seed=0)


@pytest.fixture(scope="module")
def small_reference(small_unet, small_inputs):
    return run(small_unet, small_inputs)


# --------------------------------------------------------------------------------------------- gated == sliced
SMALL_ARCHS = [(keep, seed, None) for keep in (0.3, 0.5, 0.7) for seed in (0, 1)] + [(0.5, 2, 0.0), (0.4, 3, 1.0)]


@pytest.mark.parametrize(
    ("keep", "seed", "depth"),
    SMALL_ARCHS,
    ids=[f"keep{k}-seed{s}" + {None: "", 0.0: "-no-depth", 1.0: "-all-depth"}[d] for k, s, d in SMALL_ARCHS],
)
def test_sliced_equals_gated_small(small_unet, small_space, small_inputs, small_reference, keep, seed, depth):
    arch = small_space.random(keep, seed)
    if depth is not None:
        arch = _with_depth(arch, small_space, depth)
    gated = _gated(small_unet, small_space, arch, small_inputs)
    sliced = run(slice_unet(small_unet, small_space, arch), small_inputs)
    assert_same_output(sliced, gated)
    # The architecture really changes the function (otherwise the equality above would prove nothing).
    assert (gated - small_reference).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["sd15", "sd21"])
@pytest.mark.parametrize(
    ("keep", "seed", "depth"), [(0.5, 0, None), (0.3, 1, 0.0)], ids=["keep0.5", "keep0.3-no-depth"]
)
def test_sliced_equals_gated_sd_like(request, name, keep, seed, depth):
    unet, space = request.getfixturevalue(f"{name}_unet"), request.getfixturevalue(f"{name}_space")
    inputs = unet_inputs(unet, batch=2, resolution=SD_RESOLUTION, seed=seed)
    arch = space.random(keep, seed)
    if depth is not None:
        arch = _with_depth(arch, space, depth)
    gated = _gated(unet, space, arch, inputs)
    assert_same_output(run(slice_unet(unet, space, arch), inputs), gated)
    assert (gated - run(unet, inputs)).abs().max() > 1e-2


def test_sliced_equals_gated_scale_shift_time_embedding():
    """`resnet_time_scale_shift="scale_shift"`: `time_emb_proj` has (scale, shift) halves; both must be sliced."""
    unet = build_unet(small_unet_config(resnet_time_scale_shift="scale_shift"))
    space = ArchitectureSpace.from_unet(unet, text_len=5)
    inputs = unet_inputs(unet, batch=2, resolution=SMALL_RESOLUTION)
    arch = space.random(0.5, 0)
    assert_same_output(run(slice_unet(unet, space, arch), inputs), _gated(unet, space, arch, inputs))


# --------------------------------------------------------------------------------------------- per-sample gates
def test_per_sample_gates_equal_separate_sliced_models(small_unet, small_space, small_inputs):
    archs = torch.stack([small_space.random(0.3, 10), small_space.random(0.6, 11), small_space.full()])
    batched = _gated(small_unet, small_space, archs, small_inputs)
    sample, timesteps, context = small_inputs
    for i, arch in enumerate(archs):
        single = run(
            slice_unet(small_unet, small_space, arch), (sample[i : i + 1], timesteps[i : i + 1], context[i : i + 1])
        )
        assert_same_output(batched[i : i + 1], single)


def test_one_gate_vector_applies_to_every_sample(small_unet, small_space, small_inputs):
    arch = small_space.random(0.5, 4)
    shared = _gated(small_unet, small_space, arch, small_inputs)
    per_sample = _gated(small_unet, small_space, arch.expand(3, -1), small_inputs)
    assert torch.equal(shared, per_sample)


def test_classifier_free_guidance_tiling(small_unet, small_space, small_inputs):
    """Gates for B samples apply to the 2B batch `torch.cat([uncond, cond])` of classifier-free guidance."""
    sample, timesteps, context = small_inputs
    uncond = torch.zeros_like(context)
    archs = torch.stack([small_space.random(0.4, 20), small_space.random(0.7, 21), small_space.random(0.5, 22)])
    doubled = (torch.cat([sample, sample]), torch.cat([timesteps, timesteps]), torch.cat([uncond, context]))
    tiled = _gated(small_unet, small_space, archs, doubled)
    assert_same_output(tiled[:3], _gated(small_unet, small_space, archs, (sample, timesteps, uncond)), rel=1e-5)
    assert_same_output(tiled[3:], _gated(small_unet, small_space, archs, small_inputs), rel=1e-5)


def test_mismatched_gate_batch_raises(small_unet, small_space, small_inputs):
    sample, timesteps, context = small_inputs  # batch 3
    archs = torch.stack([small_space.random(0.5, 0), small_space.random(0.5, 1)])  # 2 samples
    with pytest.raises(ValueError, match="2 samples"), apply_gates(small_unet, small_space, archs):
        run(small_unet, small_inputs)
    assert _hook_count(small_unet) == 0  # the hooks are gone even after the error


# -------------------------------------------------------------------------------------------------- hook hygiene
def test_full_gates_leave_output_unchanged(small_unet, small_space, small_inputs, small_reference):
    assert torch.equal(_gated(small_unet, small_space, small_space.full(), small_inputs), small_reference)


def test_hooks_are_removed_after_the_context(small_unet, small_space, small_inputs, small_reference):
    before = _hook_count(small_unet)
    with apply_gates(small_unet, small_space, small_space.random(0.3, 0)) as controller:
        assert isinstance(controller, UNetGates)
        assert _hook_count(small_unet) == before + len(small_space)
        assert not torch.equal(run(small_unet, small_inputs), small_reference)
    assert _hook_count(small_unet) == before
    assert torch.equal(run(small_unet, small_inputs), small_reference)


def test_unet_gates_controller(small_unet, small_space, small_inputs, small_reference):
    arch = small_space.random(0.5, 8)
    expected = _gated(small_unet, small_space, arch, small_inputs)
    controller = UNetGates(small_unet, small_space).attach()
    try:
        assert controller.attach() is controller
        assert _hook_count(small_unet) == len(small_space)  # attaching twice does not double the hooks
        assert torch.equal(run(small_unet, small_inputs), small_reference)  # no gates set yet
        controller.set(arch)
        assert torch.equal(run(small_unet, small_inputs), expected)
        controller.set(None)
        assert torch.equal(run(small_unet, small_inputs), small_reference)
        with pytest.raises(ValueError, match=f"dim={small_space.dim}"):
            controller.set(torch.ones(small_space.dim + 1))
    finally:
        controller.detach()
    assert _hook_count(small_unet) == 0


# ---------------------------------------------------------------------------------------------------- soft gates
def test_soft_gates_are_differentiable(small_unet, small_space, small_inputs):
    generator = torch.Generator().manual_seed(0)
    gates = (0.3 + 0.6 * torch.rand(small_space.dim, generator=generator)).requires_grad_()
    sample, timesteps, context = small_inputs
    with apply_gates(small_unet, small_space, gates):
        out = small_unet(sample, timesteps, encoder_hidden_states=context).sample
    out.pow(2).mean().backward()
    assert gates.grad is not None
    assert torch.isfinite(gates.grad).all()
    for unit in small_space:  # every unit's hook is in the graph
        assert small_space.gates_of(gates.grad, unit.name).abs().sum() > 0, unit.name
    small_unet.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------------- slicing
def test_slice_unet_leaves_the_original_untouched(small_unet, small_space, small_inputs, small_reference):
    before = {k: v.clone() for k, v in small_unet.state_dict().items()}
    modules_before = [(name, type(m)) for name, m in small_unet.named_modules()]
    sliced = slice_unet(small_unet, small_space, small_space.random(0.3, 0))
    after = small_unet.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [(name, type(m)) for name, m in small_unet.named_modules()] == modules_before
    assert torch.equal(run(small_unet, small_inputs), small_reference)
    assert sum(p.numel() for p in sliced.parameters()) < 0.7 * sum(p.numel() for p in small_unet.parameters())
    assert sliced is not small_unet


def test_slice_full_arch_is_the_same_model(small_unet, small_space, small_inputs, small_reference):
    sliced = slice_unet(small_unet, small_space, small_space.full())
    assert sum(p.numel() for p in sliced.parameters()) == sum(p.numel() for p in small_unet.parameters())
    assert torch.equal(run(sliced, small_inputs), small_reference)


def _keep_sets_with(space, **changes):
    keep_sets = space.keep_sets(space.full())
    keep_sets.update(changes)
    return space.from_keep_sets(keep_sets)


def test_sliced_groupnorm_has_fewer_groups_of_the_same_size(small_unet, small_space):
    name = "resnet:up_blocks.1.resnets.0"
    unit = small_space[name]
    kept = [1, 4, 5]
    sliced = slice_unet(small_unet, small_space, _keep_sets_with(small_space, **{name: kept}))
    old, new = small_unet.get_submodule(unit.module), sliced.get_submodule(unit.module)
    size = unit.channels_per_gate
    assert new.norm2.num_groups == len(kept) < old.norm2.num_groups
    assert new.norm2.num_channels // new.norm2.num_groups == size == old.norm2.num_channels // old.norm2.num_groups
    idx = torch.tensor([g * size + c for g in kept for c in range(size)])
    assert torch.equal(new.norm2.weight, old.norm2.weight[idx])
    assert torch.equal(new.norm2.bias, old.norm2.bias[idx])
    assert torch.equal(new.conv1.weight, old.conv1.weight[idx])
    assert torch.equal(new.conv1.bias, old.conv1.bias[idx])
    assert torch.equal(new.time_emb_proj.weight, old.time_emb_proj.weight[idx])
    assert torch.equal(new.conv2.weight, old.conv2.weight[:, idx])
    assert torch.equal(new.conv2.bias, old.conv2.bias)


def test_geglu_slicing_keeps_both_halves(small_unet, small_space):
    name = "ff:down_blocks.2.attentions.0.transformer_blocks.0.ff"
    unit = small_space[name]
    sliced = slice_unet(small_unet, small_space, _keep_sets_with(small_space, **{name: [0, 2]}))
    old, new = small_unet.get_submodule(unit.module), sliced.get_submodule(unit.module)
    inner = old.net[2].in_features
    assert old.net[0].proj.out_features == 2 * inner  # GEGLU: value and gate halves
    size = unit.channels_per_gate
    idx = torch.cat([torch.arange(0, size), torch.arange(2 * size, 3 * size)])
    rows = torch.cat([idx, inner + idx])
    assert new.net[0].proj.out_features == 2 * len(idx)
    assert torch.equal(new.net[0].proj.weight[: len(idx)], old.net[0].proj.weight[idx])  # value rows
    assert torch.equal(new.net[0].proj.weight[len(idx) :], old.net[0].proj.weight[inner + idx])  # gate rows
    assert torch.equal(new.net[0].proj.bias, old.net[0].proj.bias[rows])
    assert torch.equal(new.net[2].weight, old.net[2].weight[:, idx])
    assert torch.equal(new.net[2].bias, old.net[2].bias)


@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_sliced_attention_heads(small_unet, small_space, kind):
    name = f"{kind}:up_blocks.0.attentions.1.transformer_blocks.0.{kind}"
    unit = small_space[name]
    kept = [0, 3, 7]
    sliced = slice_unet(small_unet, small_space, _keep_sets_with(small_space, **{name: kept}))
    old, new = small_unet.get_submodule(unit.module), sliced.get_submodule(unit.module)
    head_dim = unit.channels_per_gate
    idx = torch.tensor([h * head_dim + c for h in kept for c in range(head_dim)])
    assert new.heads == len(kept) and old.heads == unit.num_gates
    for proj in ("to_q", "to_k", "to_v"):
        assert getattr(new, proj).out_features == len(kept) * head_dim
        assert torch.equal(getattr(new, proj).weight, getattr(old, proj).weight[idx])
    assert torch.equal(new.to_out[0].weight, old.to_out[0].weight[:, idx])
    assert new.to_k.in_features == old.to_k.in_features  # the text / image width is not pruned


def test_dropped_depth_units_become_pass_throughs(small_unet, small_space):
    arch = _with_depth(small_space.full(), small_space, 0.0)
    sliced = slice_unet(small_unet, small_space, arch)
    for unit in small_space.depth_units:
        module = sliced.get_submodule(unit.module)
        expected = ResnetPassThrough if unit.kind is UnitKind.RESNET_DEPTH else TransformerPassThrough
        assert isinstance(module, expected), unit.name
        assert not list(module.parameters())
