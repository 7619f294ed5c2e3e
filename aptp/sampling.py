"""The denoising call and loop shared by training (evaluation, sample grids) and serving.

Seeds are per image: each image's starting noise comes from its own generator, and the sampler is deterministic,
so an image depends on its seed and prompt, not on the batch it is computed in.

Coordinate input: a U-Net whose config has `in_channels == out_channels + 2` takes, after the image channels, two
constant planes holding each pixel's row and column in [-1, 1] (CoordConv). Convolutions and attention are otherwise
translation-equivariant, so without them a small model has no reliable way to put "the square in the top left"
in the top left. `denoise` appends the planes; every caller goes through it.

Prompt map input: any further input channels (`in_channels = out_channels + 2 + C`) take a text adapter's prompt
map (`aptp.conditioning.adapter`: `(B, C, g, g)`, one value vector per cell of a coarse grid), stretched over the image
by nearest-neighbour resizing and appended after the coordinate planes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from aptp.conditioning.prompts import Conditioning

COORDINATE_CHANNELS = 2


class SamplingConfig(BaseModel):
    """A model's default sampling settings (teacher folders and bundles store them; requests may override them).

    Parameters:
        steps (`int`): denoising steps of the DPM-Solver++ sampler.
        guidance_scale (`float`): classifier-free guidance scale (1.0: no unconditional branch).
    """

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(25, ge=1, le=1000)
    guidance_scale: float = Field(4.0, ge=0.0)


def input_layout(in_channels: int, out_channels: int) -> tuple[int, int]:
    """(coordinate planes, prompt-map channels) a U-Net with these channel counts takes after the image channels."""
    extra = in_channels - out_channels
    if extra < 0 or 0 < extra < COORDINATE_CHANNELS:
        raise ValueError(
            f"U-Net config has in_channels={in_channels}, out_channels={out_channels}: supported are equal counts, "
            f"or in_channels = out_channels + {COORDINATE_CHANNELS} (coordinate planes) + prompt-map channels"
        )
    return min(extra, COORDINATE_CHANNELS), max(extra - COORDINATE_CHANNELS, 0)


def coordinate_channels(unet: nn.Module) -> int:
    """How many coordinate planes `unet` expects after the image channels (0 or 2), from its config alone."""
    return input_layout(unet.config.in_channels, unet.config.out_channels)[0]


def prompt_map_channels(unet: nn.Module) -> int:
    """How many prompt-map channels `unet` expects after the coordinate planes, from its config alone."""
    return input_layout(unet.config.in_channels, unet.config.out_channels)[1]


def coordinate_planes(batch: int, height: int, width: int, device, dtype) -> torch.Tensor:
    """`(batch, 2, height, width)`: row then column position of each pixel centre, scaled to [-1, 1]."""
    rows = torch.linspace(-1.0, 1.0, height, device=device, dtype=dtype)
    cols = torch.linspace(-1.0, 1.0, width, device=device, dtype=dtype)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"))
    return grid.unsqueeze(0).expand(batch, -1, -1, -1)


def denoise(unet: nn.Module, x: torch.Tensor, timesteps, cond: Conditioning):
    """One U-Net call on noisy images `x` `(B, C, H, W)` reading `cond` (`B` rows: its token states, mask and, when
    the U-Net takes one, prompt map); returns the diffusers output (`.sample`)."""
    coordinates, map_channels = input_layout(unet.config.in_channels, unet.config.out_channels)
    batch, _, height, width = x.shape
    prompt_map = cond.prompt_map
    planes = [x]
    if coordinates:
        planes.append(coordinate_planes(batch, height, width, x.device, x.dtype))
    if map_channels:
        if prompt_map is None or prompt_map.shape[:2] != (batch, map_channels):
            got = "none" if prompt_map is None else tuple(prompt_map.shape)
            raise ValueError(f"the U-Net takes a {map_channels}-channel prompt map for {batch} images, got {got}")
        planes.append(F.interpolate(prompt_map.to(x.dtype), size=(height, width), mode="nearest"))
    elif prompt_map is not None:
        raise ValueError("a prompt map was given to a U-Net that takes none")
    x = torch.cat(planes, dim=1) if len(planes) > 1 else x
    return unet(x, timesteps, encoder_hidden_states=cond.states, encoder_attention_mask=cond.mask)


def make_sampler(training_scheduler_config: dict) -> SchedulerMixin:
    """A DPM-Solver++ (2M) sampler matching the noise schedule and prediction type the model was trained with."""
    return DPMSolverMultistepScheduler.from_config(dict(training_scheduler_config))


def initial_noise(seeds: Sequence[int | torch.Generator], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """`(len(seeds), *shape)` noise, image i drawn on the CPU from `seeds[i]`: a seed (for a fresh generator) or a
    generator of its own (as diffusers takes a list of generators), so an image's noise is the same on any device
    and in any batch."""
    generators = [s if isinstance(s, torch.Generator) else torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = [torch.randn(shape, generator=g, device=g.device) for g in generators]
    return torch.stack(noise).to(device=device, dtype=dtype)


def is_guided(guidance_scales: Sequence[float]) -> bool:
    """Whether a batch runs the unconditional branch: any row's scale is not 1 (then every row runs both)."""
    return any(float(scale) != 1.0 for scale in guidance_scales)


def unet_calls(steps: int, guidance_scales: Sequence[float]) -> int:
    """U-Net calls each image of a batch costs: one per step, two under classifier-free guidance."""
    return steps * (2 if is_guided(guidance_scales) else 1)


class Trajectory:
    """Rows denoised together from noise to images: their noise, their own copy of the sampler (so its multistep
    history is theirs alone), step count, guidance scales and prompts. `advance` moves any number of trajectories of
    one U-Net one step in one call, each at its own timestep: one trajectory run to the end is `sample`; several,
    joining and leaving between steps, are the server's step-level batching. Rows never read each other, so an
    image depends on its own seed, prompt, steps and guidance, not on what it shares a call with.

    Parameters:
        unet (`nn.Module`): the U-Net the trajectory is for (its device and dtype are the trajectory's).
        sampler (`SchedulerMixin`): the sampler to copy (its config; the copy keeps the per-trajectory state).
        cond (`Conditioning`): one row per image.
        uncond (`Conditioning`): one row per image, or one row for all (the empty prompt).
        seeds: one seed or generator per image.
        steps (`int`): denoising steps.
        guidance_scale (`float` or a sequence of them, one per image): 1.0 everywhere needs no unconditional branch.
        resolution (`int`): the U-Net's input size.
    """

    def __init__(
        self,
        unet: nn.Module,
        sampler: SchedulerMixin,
        cond: Conditioning,
        uncond: Conditioning,
        seeds: Sequence[int | torch.Generator],
        steps: int = SamplingConfig().steps,
        guidance_scale: float | Sequence[float] = SamplingConfig().guidance_scale,
        resolution: int = 32,
    ):
        batch = len(cond)
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
        scales = [float(guidance_scale)] * batch if isinstance(guidance_scale, int | float) else list(guidance_scale)
        if len(scales) != batch:
            raise ValueError(f"{len(scales)} guidance scales for {batch} prompts")
        if len(uncond) not in (1, batch):
            raise ValueError(f"{len(uncond)} unconditional rows for {batch} prompts (give one, or one per prompt)")
        param = next(unet.parameters())
        self.sampler = type(sampler).from_config(sampler.config)
        self.sampler.set_timesteps(steps, device=param.device)
        noise = initial_noise(seeds, (unet.config.out_channels, resolution, resolution), param.device, param.dtype)
        self.x = noise * self.sampler.init_noise_sigma
        self.guidance_scales = scales
        self.scale = torch.tensor(scales, device=param.device, dtype=param.dtype).view(batch, 1, 1, 1)
        self.cond = cond.for_unet().to(dtype=param.dtype)
        uncond = uncond.repeat(batch) if len(uncond) == 1 and batch > 1 else uncond
        self.uncond = uncond.for_unet().to(dtype=param.dtype)
        self.steps, self.step = steps, 0

    def __len__(self) -> int:
        return len(self.x)

    @property
    def guided(self) -> bool:
        return is_guided(self.guidance_scales)

    @property
    def done(self) -> bool:
        return self.step >= self.steps

    @property
    def timestep(self) -> torch.Tensor:
        return self.sampler.timesteps[self.step]


@torch.no_grad()
def advance(unet: nn.Module, trajectories: Sequence[Trajectory]) -> None:
    """One denoising step of every trajectory (none of them done) in one U-Net call: rows concatenated, each with its
    trajectory's timestep. When any trajectory is guided, every row runs both branches (as `unet_calls` counts)."""
    if any(t.done for t in trajectories):
        raise ValueError("advance: a trajectory has taken all its steps")
    sizes = [len(t) for t in trajectories]
    x = torch.cat([t.sampler.scale_model_input(t.x, t.timestep) for t in trajectories])
    timesteps = torch.cat([t.timestep.reshape(1).expand(len(t)) for t in trajectories])
    cond = Conditioning.cat([t.cond for t in trajectories])
    guided = any(t.guided for t in trajectories)
    if guided:
        context = Conditioning.cat([Conditioning.cat([t.uncond for t in trajectories]), cond])  # unconditional first
        out = denoise(unet, torch.cat([x, x]), torch.cat([timesteps, timesteps]), context).sample
        out_uncond, out_cond = out.chunk(2)
        scale = torch.cat([t.scale for t in trajectories])
        out = out_uncond + scale * (out_cond - out_uncond)
    else:
        out = denoise(unet, x, timesteps, cond).sample
    for trajectory, rows in zip(trajectories, out.split(sizes), strict=True):
        trajectory.x = trajectory.sampler.step(rows, trajectory.timestep, trajectory.x).prev_sample
        trajectory.step += 1


@torch.no_grad()
def sample(
    unet: nn.Module,
    sampler: SchedulerMixin,
    cond: Conditioning,
    uncond: Conditioning,
    seeds: Sequence[int | torch.Generator],
    steps: int = SamplingConfig().steps,
    guidance_scale: float | Sequence[float] = SamplingConfig().guidance_scale,
    resolution: int = 32,
) -> torch.Tensor:
    """Generate one image per row of `cond` with classifier-free guidance against `uncond` (one row per row of
    `cond`: each image's negative prompt, or one row for all: the empty prompt); returns the model-space samples
    `(B, C, H, W)`, unclipped. `guidance_scale` is one value or one per row; 1.0 everywhere skips the
    unconditional branch. One `Trajectory`, run to its end."""
    return run_to_end(unet, Trajectory(unet, sampler, cond, uncond, seeds, steps, guidance_scale, resolution))


def run_to_end(unet: nn.Module, trajectory: Trajectory) -> torch.Tensor:
    """Every step a trajectory has left, alone; its final samples."""
    while not trajectory.done:
        advance(unet, [trajectory])
    return trajectory.x
