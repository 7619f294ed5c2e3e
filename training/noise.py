"""Noisy training inputs for the denoising objective, shared by every training stage."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler


def min_snr_weight(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str):
    """Per-sample loss weight of min-SNR-gamma (Hang et al. 2023) for epsilon or v targets."""
    alpha_bar = alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


@dataclass
class NoisyBatch:
    """One batch of denoising inputs and targets (a function of the step's generator, so runs resume exactly)."""

    noisy: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,)
    target: torch.Tensor  # (B, C, H, W) noise or velocity
    weight: torch.Tensor  # (B,) min-SNR-gamma weights

    def select(self, rows: slice) -> NoisyBatch:
        return NoisyBatch(self.noisy[rows], self.timesteps[rows], self.target[rows], self.weight[rows])

    @classmethod
    def make(
        cls,
        scheduler: DDPMScheduler,
        x0: torch.Tensor,
        generator: torch.Generator,
        gamma: float,
        share: slice | None = None,
        total: int | None = None,
    ) -> NoisyBatch:
        """Noise `x0`, the rows `share` of a global batch of `total` (default: all of it): the draws are made for
        the global batch, so a process's rows get what they would in a one-process run."""
        total = total or x0.shape[0]
        share = share or slice(0, total)
        noise = torch.randn((total, *x0.shape[1:]), generator=generator)[share].to(x0.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (total,), generator=generator)
        timesteps = timesteps[share].to(x0.device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        prediction = scheduler.config.prediction_type
        target = scheduler.get_velocity(x0, noise, timesteps) if prediction == "v_prediction" else noise
        weight = min_snr_weight(scheduler.alphas_cumprod.to(x0.device), timesteps, gamma, prediction)
        return cls(noisy, timesteps, target, weight)
