"""From what the U-Net denoises to pixels: the identity for a pixel-space model (the embedded teacher), a VAE
decoder for a latent-diffusion model (Stable Diffusion). Both give model-space images in [-1, 1] (unclipped);
`to_uint8` and `to_unit_range` turn those into what is served or returned."""

from __future__ import annotations

import torch
from torch import nn

from pruning.macs import meta_flop_macs


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Model-space images in [-1, 1] (clipped) to uint8 [0, 255]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Model-space images to float [0, 1], as diffusers' image processor denormalises them."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


class PixelDecoder:
    """A pixel-space model's "decoder": the denoised sample is the image."""

    scale_factor = 1
    macs_per_image = 0

    def __init__(self, channels: int = 3):
        self.latent_channels = channels

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> PixelDecoder:
        return self


class VaeDecoder:
    """A latent-diffusion model's VAE decoder (diffusers `AutoencoderKL`), resident on the serving device.

    Parameters:
        vae (`AutoencoderKL`): the pipeline's VAE (its encoder is kept but never run here).
        latent_size (`int`): the U-Net's input size, for the MACs of one decoded image.
    """

    def __init__(self, vae: nn.Module, latent_size: int):
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        size = (1, self.latent_channels, latent_size, latent_size)
        self.macs_per_image = meta_flop_macs(vae, lambda twin: twin.decode(torch.zeros(size, device="meta")))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """`(B, C, h, w)` latents -> `(B, 3, h * scale_factor, w * scale_factor)` images in [-1, 1], decoded as one
        batch on the VAE's device and dtype."""
        parameter = next(self.vae.parameters())
        z = latents.to(parameter.device, parameter.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> VaeDecoder:
        self.vae.to(device=device, dtype=dtype)
        return self
