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
    unconditional branch."""
    batch = len(cond)
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
    scales = [float(guidance_scale)] * batch if isinstance(guidance_scale, int | float) else list(guidance_scale)
    if len(scales) != batch:
        raise ValueError(f"{len(scales)} guidance scales for {batch} prompts")
    if len(uncond) not in (1, batch):
        raise ValueError(f"{len(uncond)} unconditional rows for {batch} prompts (give one, or one per prompt)")
    param = next(unet.parameters())
    channels = unet.config.out_channels
    x = initial_noise(seeds, (channels, resolution, resolution), param.device, param.dtype)
    # Schedulers keep per-call state, so work on a private copy.
    sampler = type(sampler).from_config(sampler.config)
    sampler.set_timesteps(steps, device=param.device)
    x = x * sampler.init_noise_sigma
    guided = is_guided(scales)
    cond, uncond = cond.for_unet(), uncond.for_unet()
    if guided:
        scale = torch.tensor(scales, device=param.device, dtype=param.dtype).view(batch, 1, 1, 1)
        uncond = uncond.repeat(batch) if len(uncond) == 1 else uncond
        context = Conditioning.cat([uncond, cond])  # 2B rows: unconditional first
    else:
        context = cond
    context = context.to(dtype=param.dtype)
    for t in sampler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        model_in = sampler.scale_model_input(model_in, t)
        out = denoise(unet, model_in, t, context).sample
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + scale * (out_cond - out_uncond)
        x = sampler.step(out, t, x).prev_sample
    return x
