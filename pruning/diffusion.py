"""The denoising loop shared by training (evaluation, sample grids) and serving.

Seeds are per image: each image's starting noise comes from its own generator, and the sampler is deterministic,
so an image depends on its seed and prompt, not on the batch it is computed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DPMSolverMultistepScheduler, SchedulerMixin
from torch import nn


def make_sampler(training_scheduler_config: dict) -> SchedulerMixin:
    """A DPM-Solver++ (2M) sampler matching the noise schedule and prediction type the model was trained with."""
    return DPMSolverMultistepScheduler.from_config(dict(training_scheduler_config))


def initial_noise(seeds: Sequence[int], shape: tuple[int, ...], device, dtype) -> torch.Tensor:
    """`(len(seeds), *shape)` noise, image i drawn from a CPU generator seeded with `seeds[i]` (same on any device)."""
    noise = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device=device, dtype=dtype)


@torch.no_grad()
def sample(
    unet: nn.Module,
    sampler: SchedulerMixin,
    cond: torch.Tensor,
    cond_mask: torch.Tensor | None,
    uncond: torch.Tensor,
    uncond_mask: torch.Tensor | None,
    seeds: Sequence[int],
    steps: int = 25,
    guidance_scale: float = 4.0,
    resolution: int = 32,
) -> torch.Tensor:
    """Generate one image per row of `cond` (`(B, L, D)` token states) with classifier-free guidance against
    `uncond` (`(B, L, D)` or `(1, L, D)`); returns the model-space samples `(B, C, H, W)`, unclipped."""
    batch = cond.shape[0]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
    param = next(unet.parameters())
    channels = unet.config.in_channels
    x = initial_noise(seeds, (channels, resolution, resolution), param.device, param.dtype)
    # Schedulers keep per-call state, so work on a private copy.
    sampler = type(sampler).from_config(sampler.config)
    sampler.set_timesteps(steps, device=param.device)
    x = x * sampler.init_noise_sigma
    guided = guidance_scale != 1.0
    if guided:
        uncond = uncond.expand(batch, -1, -1)
        context = torch.cat([uncond, cond]).to(param.dtype)  # (2B, L, D)
        if cond_mask is not None and uncond_mask is not None:
            mask = torch.cat([uncond_mask.expand(batch, -1), cond_mask])
        else:
            mask = None
    else:
        context, mask = cond.to(param.dtype), cond_mask
    for t in sampler.timesteps:
        model_in = torch.cat([x, x]) if guided else x
        model_in = sampler.scale_model_input(model_in, t)
        out = unet(model_in, t, encoder_hidden_states=context, encoder_attention_mask=mask).sample
        if guided:
            out_uncond, out_cond = out.chunk(2)
            out = out_uncond + guidance_scale * (out_cond - out_uncond)
        x = sampler.step(out, t, x).prev_sample
    return x
