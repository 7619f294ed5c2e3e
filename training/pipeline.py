"""Prompt -> image with one U-Net (a teacher or one sliced expert), for evaluation, grids and `aptp generate`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from pruning.diffusion import make_sampler, sample, unit_range_to_uint8
from pruning.teacher import TeacherSpec, load_teacher
from router.encoder import EncoderConfig, PromptEncoder


class TextToImage:
    """Encoder + U-Net + sampler. Images are uint8 `(N, 3, H, W)`.

    Parameters:
        unet (`nn.Module`): the denoiser.
        spec (`TeacherSpec`): resolution, text encoder, noise schedule and sampling defaults.
        encoder (`PromptEncoder`, *optional*): shared encoder (built from `spec` if not given).
    """

    def __init__(self, unet: nn.Module, spec: TeacherSpec, encoder: PromptEncoder | None = None):
        self.unet = unet.eval()
        self.spec = spec
        device = next(unet.parameters()).device
        self.encoder = encoder or PromptEncoder(EncoderConfig(**spec.text_encoder), device=device)
        self.sampler = make_sampler(spec.scheduler_config)
        self._empty = self.encoder.encode([""])

    @classmethod
    def from_teacher(cls, folder: str | Path, device: str = "cpu") -> TextToImage:
        unet, spec = load_teacher(folder, device=device)
        return cls(unet, spec)

    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 32,
    ) -> torch.Tensor:
        steps = steps or int(self.spec.sampling.get("steps", 25))
        guidance = float(self.spec.sampling.get("guidance_scale", 4.0) if guidance_scale is None else guidance_scale)
        images = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            encoded = self.encoder.encode(chunk)
            x = sample(
                self.unet,
                self.sampler,
                encoded.tokens,
                encoded.mask,
                self._empty.tokens,
                self._empty.mask,
                seeds[start : start + batch_size],
                steps=steps,
                guidance_scale=guidance,
                resolution=self.spec.resolution,
            )
            images.append(unit_range_to_uint8(x.float().cpu()))
        return torch.cat(images)
