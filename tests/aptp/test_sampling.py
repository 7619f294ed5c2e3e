"""The sampling loop: per-image seeds make an image independent of the batch it is computed in."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

from aptp.conditioning.prompts import Conditioning
from aptp.sampling import (
    Trajectory,
    advance,
    coordinate_channels,
    coordinate_planes,
    denoise,
    initial_noise,
    make_sampler,
    prompt_map_channels,
    sample,
)
from tests.helpers import build_unet, pixel_unet_config

CROSS_DIM = 16
TOKENS = 6
RESOLUTION = 16
STEPS = 3


@pytest.fixture(scope="module")
def unet():
    config = pixel_unet_config(RESOLUTION, CROSS_DIM)
    return build_unet(config, seed=4)


@pytest.fixture(scope="module")
def sampler():
    training = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    return make_sampler(training.config)


@pytest.fixture(scope="module")
def prompts():
    """Three prompts' token states with padding masks of different lengths, and the empty prompt's."""
    generator = torch.Generator().manual_seed(0)
    cond = torch.randn(3, TOKENS, CROSS_DIM, generator=generator)
    mask = torch.zeros(3, TOKENS, dtype=torch.int64)
    for row, length in enumerate((2, 4, 6)):
        mask[row, :length] = 1
    uncond = torch.randn(1, TOKENS, CROSS_DIM, generator=generator)
    uncond_mask = torch.zeros(1, TOKENS, dtype=torch.int64)
    uncond_mask[0, :2] = 1
    return cond, mask, uncond, uncond_mask


def _sample(unet, sampler, prompts, rows, seeds, **kwargs):
    cond, mask, uncond, uncond_mask = prompts
    kwargs = {"steps": STEPS, "guidance_scale": 3.0, "resolution": RESOLUTION, **kwargs}
    return sample(
        unet, sampler, Conditioning(cond[rows], mask[rows]), Conditioning(uncond, uncond_mask), seeds, **kwargs
    )


def test_make_sampler_keeps_the_training_schedule(sampler):
    assert isinstance(sampler, DPMSolverMultistepScheduler)
    assert sampler.config.prediction_type == "v_prediction"
    assert sampler.config.beta_schedule == "squaredcos_cap_v2"
    assert sampler.config.num_train_timesteps == 1000


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_an_image_does_not_depend_on_its_batch(unet, sampler, prompts, guidance_scale):
    batch = _sample(unet, sampler, prompts, [0, 1, 2], [10, 11, 12], guidance_scale=guidance_scale)
    assert batch.shape == (3, 3, RESOLUTION, RESOLUTION)
    assert torch.isfinite(batch).all()
    for row, seed in enumerate((10, 11, 12)):
        alone = _sample(unet, sampler, prompts, [row], [seed], guidance_scale=guidance_scale)
        assert alone.shape == (1, 3, RESOLUTION, RESOLUTION)
        diff = (alone[0] - batch[row]).abs().max().item()
        assert diff < 1e-4, f"row {row}: max abs difference {diff:.3e}"


def test_order_in_the_batch_does_not_matter(unet, sampler, prompts):
    forward = _sample(unet, sampler, prompts, [0, 1, 2], [10, 11, 12])
    backward = _sample(unet, sampler, prompts, [2, 1, 0], [12, 11, 10])
    assert (forward - backward.flip(0)).abs().max().item() < 1e-4


def test_same_seed_and_prompt_repeat_exactly(unet, sampler, prompts):
    first = _sample(unet, sampler, prompts, [1], [5])
    assert torch.equal(first, _sample(unet, sampler, prompts, [1], [5]))


def test_different_seeds_give_different_images(unet, sampler, prompts):
    images = _sample(unet, sampler, prompts, [1, 1], [5, 6])
    assert (images[0] - images[1]).abs().mean().item() > 0.05


def test_guidance_changes_the_image(unet, sampler, prompts):
    guided = _sample(unet, sampler, prompts, [1], [5], guidance_scale=3.0)
    unguided = _sample(unet, sampler, prompts, [1], [5], guidance_scale=1.0)
    assert (guided - unguided).abs().max().item() > 1e-3


def test_the_shared_sampler_is_not_mutated(unet, sampler, prompts):
    """`sample` works on a private copy of the scheduler, so a served sampler can be shared between calls."""
    before = dict(sampler.config)
    _sample(unet, sampler, prompts, [0], [1], steps=2)
    assert dict(sampler.config) == before
    assert sampler.num_inference_steps is None


def test_mismatched_seed_count_raises(unet, sampler, prompts):
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        _sample(unet, sampler, prompts, [0, 1, 2], [1, 2])


def test_initial_noise_is_per_seed():
    noise = initial_noise([3, 4, 3], (2, 4, 4), "cpu", torch.float32)
    assert noise.shape == (3, 2, 4, 4)
    assert torch.equal(noise[0], noise[2]) and not torch.equal(noise[0], noise[1])
    assert torch.equal(noise[1], torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(4)))


def test_coordinate_planes_hold_row_then_column_in_unit_range():
    planes = coordinate_planes(2, 3, 4, "cpu", torch.float32)
    assert planes.shape == (2, 2, 3, 4)
    rows, cols = planes[0]
    assert torch.equal(rows[:, 0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(cols[0], torch.linspace(-1, 1, 4))
    assert torch.equal(rows[:, 0:1].expand(3, 4), rows)  # constant along a row


def test_denoise_appends_the_coordinate_planes_after_the_image(unet, prompts):
    assert unet.config.in_channels == unet.config.out_channels + 2
    cond, mask, _, _ = prompts
    x = torch.randn(3, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        got = denoise(unet, x, t, Conditioning(cond, mask)).sample
        full_input = torch.cat([x, coordinate_planes(3, RESOLUTION, RESOLUTION, "cpu", x.dtype)], dim=1)
        expected = unet(full_input, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected)


def test_denoise_stretches_the_prompt_map_over_the_image_after_the_coordinates(prompts):
    unet = build_unet(pixel_unet_config(RESOLUTION, CROSS_DIM, in_channels=3 + 2 + 4), seed=0)
    assert prompt_map_channels(unet) == 4
    cond, mask, _, _ = prompts
    x = torch.randn(3, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 500, 900])
    prompt_map = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = denoise(unet, x, t, Conditioning(cond, mask, prompt_map=prompt_map)).sample
        # Cell (row, col) of a 2x2 map covers the matching quarter of the image.
        stretched = prompt_map.repeat_interleave(RESOLUTION // 2, dim=2).repeat_interleave(RESOLUTION // 2, dim=3)
        planes = coordinate_planes(3, RESOLUTION, RESOLUTION, "cpu", x.dtype)
        full_input = torch.cat([x, planes, stretched], dim=1)
        expected = unet(full_input, t, encoder_hidden_states=cond, encoder_attention_mask=mask).sample
    torch.testing.assert_close(got, expected)
    with pytest.raises(ValueError, match="takes a 4-channel prompt map for 3 images, got none"):
        denoise(unet, x, t, Conditioning(cond, mask))
    with pytest.raises(ValueError, match=r"got \(3, 2, 2, 2\)"):
        denoise(unet, x, t, Conditioning(cond, mask, prompt_map=prompt_map[:, :2]))


def test_a_prompt_map_for_a_unet_that_takes_none_is_refused(unet, prompts):
    cond, mask, _, _ = prompts
    x = torch.zeros(3, 3, RESOLUTION, RESOLUTION)
    with pytest.raises(ValueError, match="a prompt map was given to a U-Net that takes none"):
        denoise(unet, x, torch.tensor([1, 2, 3]), Conditioning(cond, mask, prompt_map=torch.zeros(3, 4, 2, 2)))


def test_an_unknown_input_layout_is_refused():
    odd = build_unet(pixel_unet_config(RESOLUTION, CROSS_DIM, in_channels=4), seed=0)
    with pytest.raises(ValueError, match="in_channels=4"):
        coordinate_channels(odd)


def _trajectory(unet, sampler, prompts, rows, seeds, **kwargs):
    cond, mask, uncond, uncond_mask = prompts
    kwargs = {"steps": STEPS, "guidance_scale": 3.0, "resolution": RESOLUTION, **kwargs}
    return Trajectory(
        unet, sampler, Conditioning(cond[rows], mask[rows]), Conditioning(uncond, uncond_mask), seeds, **kwargs
    )


def test_trajectories_that_join_and_leave_between_steps_make_the_images_they_make_alone(unet, sampler, prompts):
    """Step-level batching: trajectories of other step counts and guidance, joining a running call at its next
    step, each give the image `sample` gives it alone."""
    first = _trajectory(unet, sampler, prompts, [0, 1], [20, 21], steps=4)
    second = _trajectory(unet, sampler, prompts, [2], [22], steps=2, guidance_scale=1.0)
    third = _trajectory(unet, sampler, prompts, [1], [23], steps=3, guidance_scale=5.0)
    advance(unet, [first])
    advance(unet, [first, second])  # second joins at first's second step
    advance(unet, [first, second, third])  # second is done after this one
    assert second.done and not first.done
    advance(unet, [first, third])
    assert first.done and not third.done
    advance(unet, [third])
    assert third.done
    for trajectory, rows, seeds, kwargs in (
        (first, [0, 1], [20, 21], {"steps": 4}),
        (second, [2], [22], {"steps": 2, "guidance_scale": 1.0}),
        (third, [1], [23], {"steps": 3, "guidance_scale": 5.0}),
    ):
        alone = _sample(unet, sampler, prompts, rows, seeds, **kwargs)
        diff = (alone - trajectory.x).abs().max().item()
        assert diff < 1e-4, f"{kwargs}: max abs difference {diff:.3e}"


def test_a_finished_trajectory_cannot_be_advanced(unet, sampler, prompts):
    trajectory = _trajectory(unet, sampler, prompts, [0], [1], steps=1)
    advance(unet, [trajectory])
    with pytest.raises(ValueError, match="taken all its steps"):
        advance(unet, [trajectory])
