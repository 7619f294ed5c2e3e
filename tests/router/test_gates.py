"""Gates from logits: straight-through Gumbel-sigmoid, the nested depth ordering, and the normalised (WDN)
architecture vector the router compares prompts and codes with."""

from __future__ import annotations

import pytest
import torch

from pruning import ArchitectureSpace
from router.gates import OFFSET, TEMPERATURE, depth_order, gumbel_sigmoid, nested_depth_logits, normalised_architecture
from tests.helpers import meta_unet, sd15_like_config, small_unet_config


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------- gumbel_sigmoid
def test_defaults_are_the_papers_settings():
    assert TEMPERATURE == 0.4
    assert OFFSET == 3.0


def _binary(soft: torch.Tensor) -> torch.Tensor:
    return (soft.detach() >= 0.5).to(soft.dtype)


@pytest.mark.parametrize("noise", [True, False])
def test_hard_gates_are_the_thresholded_soft_gates(noise):
    logits = (_randn(8, 200) * 4 - OFFSET).requires_grad_()  # around the threshold: both values occur
    soft, hard = gumbel_sigmoid(logits, noise=noise, generator=torch.Generator().manual_seed(1))
    assert 0 < _binary(soft).mean() < 1
    torch.testing.assert_close(hard.detach(), _binary(soft), rtol=0, atol=1e-6)
    assert hard.requires_grad


@pytest.mark.parametrize("noise", [True, False])
def test_hard_gates_are_exactly_zero_or_one(noise):
    logits = (_randn(8, 200) * 4 - OFFSET).requires_grad_()
    soft, hard = gumbel_sigmoid(logits, noise=noise, generator=torch.Generator().manual_seed(1))
    assert set(hard.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(hard.detach(), _binary(soft))


def test_straight_through_gradient_is_the_soft_gates_gradient():
    logits = (_randn(64) - OFFSET).requires_grad_()  # near the threshold: no saturated sigmoid
    weights = _randn(64, seed=1)
    soft, hard = gumbel_sigmoid(logits, noise=False)
    (hard * weights).sum().backward()
    s = torch.sigmoid((logits.detach() + OFFSET) / TEMPERATURE)
    expected = weights * s * (1 - s) / TEMPERATURE
    torch.testing.assert_close(logits.grad, expected)
    assert (logits.grad.abs() > 0).all()


def test_gradient_flows_through_noisy_hard_gates():
    logits = torch.full((32,), -OFFSET, requires_grad=True)  # soft gates near 0.5: large sigmoid slope
    _, hard = gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(0))
    hard.sum().backward()
    assert logits.grad is not None and (logits.grad > 0).all()


@pytest.mark.parametrize(("temperature", "offset"), [(TEMPERATURE, OFFSET), (0.7, -1.0), (1.0, 0.0)])
def test_noise_free_gates_are_deterministic_thresholded_sigmoids(temperature, offset):
    logits = _randn(4, 100) * 3
    soft, hard = gumbel_sigmoid(logits, temperature, offset, noise=False)
    expected = torch.sigmoid((logits + offset) / temperature)
    torch.testing.assert_close(soft, expected)
    torch.testing.assert_close(hard, (expected >= 0.5).float(), rtol=0, atol=1e-6)
    again_soft, again_hard = gumbel_sigmoid(logits, temperature, offset, noise=False)
    assert torch.equal(soft, again_soft) and torch.equal(hard, again_hard)


def test_noise_scale_moves_from_the_noisy_to_the_noise_free_gates():
    logits = _randn(4, 100) * 3 - OFFSET
    noise_free = gumbel_sigmoid(logits, noise=False)
    full = gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(3))
    assert torch.equal(gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(3), noise_scale=1.0)[0], full[0])
    off = gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(3), noise_scale=0.0)
    assert torch.equal(off[0], noise_free[0]) and torch.equal(off[1], noise_free[1])
    # Fewer gates flip against their noise-free value as the scale falls.
    flips = [
        (gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(3), noise_scale=s)[1] != noise_free[1]).sum()
        for s in (1.0, 0.3, 0.0)
    ]
    assert flips[0] > flips[1] > flips[2] == 0


def test_noise_scale_does_not_change_the_generator_stream():
    """A scheduled search must draw the same random numbers after the gates whatever the noise scale."""
    streams = []
    for scale in (1.0, 0.0):
        generator = torch.Generator().manual_seed(5)
        gumbel_sigmoid(torch.zeros(10), generator=generator, noise_scale=scale)
        streams.append(torch.rand(3, generator=generator))
    assert torch.equal(streams[0], streams[1])


def test_zero_logits_with_the_default_offset_give_the_full_network():
    soft, hard = gumbel_sigmoid(torch.zeros(1000), noise=False)
    assert (soft > 0.99).all()
    torch.testing.assert_close(hard, torch.ones(1000), rtol=0, atol=1e-6)
    # With the logistic noise too, almost every gate starts on: P(gate on) = sigmoid(3) = 0.95.
    _, noisy = gumbel_sigmoid(torch.zeros(20000), generator=torch.Generator().manual_seed(0))
    assert noisy.mean().item() == pytest.approx(torch.sigmoid(torch.tensor(OFFSET)).item(), abs=0.01)


def test_seeded_noise_is_reproducible_and_differs_between_seeds():
    logits = torch.full((500,), -OFFSET)  # on the threshold: the noise alone decides
    draws = [gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(seed)) for seed in (7, 7, 8)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(_binary(draws[0][0]), _binary(draws[2][0]))


@pytest.mark.parametrize("shift", [-1.5, 0.0, 1.0])
def test_noise_is_logistic_so_a_gate_is_on_with_probability_sigmoid_of_its_logit(shift):
    """With Logistic(0, 1) noise G, P(l + G + b >= 0) = sigmoid(l + b), whatever the temperature."""
    logits = torch.full((20000,), shift - OFFSET)
    soft, _ = gumbel_sigmoid(logits, generator=torch.Generator().manual_seed(3))
    assert _binary(soft).mean().item() == pytest.approx(torch.sigmoid(torch.tensor(shift)).item(), abs=0.015)


# -------------------------------------------------------------------------------------------- nested depth logits
def _reference_keep(raw: torch.Tensor, order: list[int]) -> torch.Tensor:
    """keep[order[j]] = sum_{i >= j} softmax(raw[order])_i, written out one unit at a time."""
    probs = raw[..., order].softmax(-1)
    keep = torch.empty_like(raw)
    for j, unit in enumerate(order):
        keep[..., unit] = probs[..., j:].sum(-1)
    return keep


ORDER = [3, 0, 5, 1, 4, 2]


def test_keep_probabilities_fall_along_the_order():
    raw = _randn(16, len(ORDER)) * 3
    keep = torch.sigmoid(nested_depth_logits(raw, ORDER))
    along = keep[:, ORDER]
    assert (along[:, 1:] <= along[:, :-1] + 1e-6).all()
    assert (along[:, 0] > 0.999).all()  # the first unit of the order is kept


def test_first_unit_of_the_order_is_always_on_in_the_noise_free_gates():
    raw = _randn(100, len(ORDER)) * 5
    soft, _ = gumbel_sigmoid(nested_depth_logits(raw, ORDER), noise=False)
    hard = _binary(soft)
    assert torch.equal(hard[:, ORDER[0]], torch.ones(100))
    assert 0 < hard.mean() < 1
    # The gates of each row form a prefix of the order.
    along = hard[:, ORDER]
    assert (along[:, 1:] <= along[:, :-1]).all()


def test_nested_logits_keep_the_input_layout():
    raw = _randn(5, len(ORDER)) * 2
    keep = torch.sigmoid(nested_depth_logits(raw, ORDER))
    expected = _reference_keep(raw, ORDER).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(keep, expected)
    # The identity order is the same computation without the permutation.
    identity = nested_depth_logits(raw[:, ORDER], list(range(len(ORDER))))
    torch.testing.assert_close(nested_depth_logits(raw, ORDER)[:, ORDER], identity)


def test_nested_logits_work_on_any_leading_batch_shape():
    raw = _randn(2, 3, len(ORDER))
    out = nested_depth_logits(raw, ORDER)
    assert out.shape == raw.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], nested_depth_logits(raw[i, j], ORDER))


def test_nested_logits_pass_gradients_to_every_raw_logit():
    raw = _randn(len(ORDER)).requires_grad_()
    nested_depth_logits(raw, ORDER)[ORDER[-1]].backward()
    assert (raw.grad.abs() > 0).all()


# -------------------------------------------------------------------------------------------------- depth order
def _block(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _resolution_level(module: str, num_blocks: int) -> int:
    """0 for the outermost (highest-resolution) blocks: down_blocks.k -> k, up_blocks.j -> num_blocks - 1 - j."""
    group, index = module.split(".")[:2]
    return int(index) if group == "down_blocks" else num_blocks - 1 - int(index)


@pytest.mark.parametrize("config", [small_unet_config(), sd15_like_config()], ids=["small", "sd15-like"])
def test_depth_order_runs_from_outermost_to_innermost(config):
    space = ArchitectureSpace.from_unet(meta_unet(config))
    order = depth_order(space)
    assert sorted(order) == list(range(len(space.depth_units)))
    num_blocks = len(config["block_out_channels"])
    levels = [_resolution_level(space.depth_units[i].module, num_blocks) for i in order]
    assert levels == sorted(levels)
    assert levels[0] == 0 and levels[-1] == num_blocks - 1
    outermost = {_block(space.depth_units[i].module) for i, level in zip(order, levels, strict=True) if level == 0}
    assert outermost == {"down_blocks.0", f"up_blocks.{num_blocks - 1}"}


def test_depth_order_on_the_small_space(small_space):
    modules = [small_space.depth_units[i].module for i in depth_order(small_space)]
    assert modules[:2] == ["down_blocks.0.resnets.1", "up_blocks.2.resnets.2"]
    innermost = {_block(m) for m in modules[-4:]}
    assert innermost == {"down_blocks.2", "up_blocks.0"}


# ------------------------------------------------------------------------------------- normalised architecture
def _random_archs(space: ArchitectureSpace, count: int) -> torch.Tensor:
    return torch.stack([space.random(0.3 + 0.6 * k / max(1, count - 1), seed=k) for k in range(count)])


def test_normalised_architecture_has_unit_norm(small_space):
    archs = _random_archs(small_space, 6)
    vectors = normalised_architecture(archs, small_space)
    assert vectors.shape == archs.shape
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(normalised_architecture(archs[2], small_space), vectors[2])


def _child_units(space: ArchitectureSpace, depth_unit_name: str):
    return [u for u in space.width_units if u.depth_parent == depth_unit_name]


def test_width_gates_under_a_dropped_module_contribute_nothing(small_space):
    depth = next(u for u in small_space.depth_units if len(_child_units(small_space, u.name)) >= 3)
    children = _child_units(small_space, depth.name)
    arch = small_space.full()
    arch[small_space.slices[depth.name]] = 0.0
    vector = normalised_architecture(arch, small_space)
    for unit in children:
        assert torch.equal(vector[small_space.slices[unit.name]], torch.zeros(unit.num_gates)), unit.name
    others = [u for u in small_space.units if u not in children and u != depth]
    for unit in others:
        assert (vector[small_space.slices[unit.name]] > 0).all(), unit.name
    # So the children's own gates do not matter while the module is dropped.
    changed = arch.clone()
    changed[small_space.slices[children[0].name]] = torch.tensor([1.0] + [0.0] * (children[0].num_gates - 1))
    torch.testing.assert_close(normalised_architecture(changed, small_space), vector)


def test_every_unit_weighs_the_same(small_space):
    sizes = {u.num_gates for u in small_space.units}
    assert {1, 8, 32} <= sizes  # depth gates, heads/groups, feed-forward groups
    weights = small_space.gate_weights()
    for unit in small_space.units:  # before normalisation: squared mass 1 per fully-kept unit
        assert (weights[small_space.slices[unit.name]] ** 2).sum().item() == pytest.approx(1.0)
    vector = normalised_architecture(small_space.full(), small_space)
    for unit in small_space.units:
        mass = (vector[small_space.slices[unit.name]] ** 2).sum().item()
        assert mass == pytest.approx(1.0 / len(small_space.units)), unit.name


def test_half_a_unit_weighs_half_as_much_whatever_its_size(small_space):
    small = next(u for u in small_space.width_units if u.num_gates == 8 and u.depth_parent is None)
    large = next(u for u in small_space.width_units if u.num_gates == 32 and u.depth_parent is None)
    arch = small_space.full()
    arch[small_space.slices[small.name].start : small_space.slices[small.name].start + 4] = 0.0
    arch[small_space.slices[large.name].start : small_space.slices[large.name].start + 16] = 0.0
    vector = normalised_architecture(arch, small_space)
    mass_small = (vector[small_space.slices[small.name]] ** 2).sum()
    mass_large = (vector[small_space.slices[large.name]] ** 2).sum()
    untouched = next(u for u in small_space.width_units if u not in (small, large) and u.depth_parent is None)
    full_unit = (vector[small_space.slices[untouched.name]] ** 2).sum()
    torch.testing.assert_close(mass_small, mass_large)
    torch.testing.assert_close(mass_small, full_unit / 2)


def test_normalised_architecture_is_differentiable_in_the_gates(small_space):
    gates = torch.full((small_space.dim,), 0.8, requires_grad=True)
    normalised_architecture(gates, small_space)[0].backward()
    assert gates.grad is not None and gates.grad.abs().sum() > 0
