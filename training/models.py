"""The teacher a training job prunes, loaded with what it reads and where its samples live: a teacher folder of the
embedded domain (pixel space, the frozen sentence encoder and its text adapter), or a diffusers Stable Diffusion
folder (latent space: images are VAE-encoded before noising; its own CLIP text encoder conditions the U-Net, a
sentence encoder feeds the router)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.conditioning.adapter import TextAdapter
from aptp.conditioning.clip import ClipConditioner
from aptp.conditioning.conditioner import Conditioner
from aptp.conditioning.encoder import EncoderConfig, PromptEncoder
from aptp.conditioning.prompts import Conditioning
from aptp.formats.diffusers import is_pipeline_folder, load_stable_diffusion, pipeline_teacher_spec
from aptp.formats.teacher import TeacherSpec, load_teacher, load_teacher_conditioner

from .data.captions import DatasetError, TrainingData
from .data.latents import LatentCache
from .distributed import Processes


@dataclass
class TrainingTeacher:
    """A frozen teacher and everything a job needs around it.

    Parameters:
        unet (`nn.Module`): the full U-Net (frozen).
        spec (`TeacherSpec`): resolution (the U-Net's input size), noise schedule, sampling defaults, and the
            router's sentence encoder (`spec.text_encoder`).
        conditioner (`Conditioner` or `ClipConditioner`): what the U-Net reads.
        router_encoder (`PromptEncoder`): what the router reads (its pooled embedding).
        text_len (`int`): the U-Net's cross-attention key length (for the MAC model).
        pixel_resolution (`int`): the side of the training images.
        vae (`nn.Module`, *optional*): the pipeline's VAE, None in pixel space.
        adapter (`TextAdapter`, *optional*): the embedded teacher's text adapter, exported with the bundle.
        pipeline (`Path`, *optional*): the diffusers folder, whose components the bundle copies.
    """

    unet: nn.Module
    spec: TeacherSpec
    conditioner: Conditioner | ClipConditioner
    router_encoder: PromptEncoder
    text_len: int
    pixel_resolution: int
    vae: nn.Module | None = None
    adapter: TextAdapter | None = None
    pipeline: Path | None = None
    latent_cache: LatentCache | None = None

    def use_latent_cache(self, data: TrainingData, processes: Processes) -> None:
        """Read the data's latents from its configured cache (the main process builds it if needed)."""
        folder = getattr(getattr(data, "config", None), "latent_cache", None)
        if folder is None:
            return
        if self.vae is None or self.pipeline is None:
            raise DatasetError(f"{folder}: a latent cache is for a latent-diffusion teacher (a diffusers pipeline)")
        if processes.is_main:
            self.latent_cache = LatentCache(folder, data, self.vae, self.pipeline / "vae")
        processes.wait()
        if not processes.is_main:
            self.latent_cache = LatentCache(folder, data, self.vae, self.pipeline / "vae")

    def samples(
        self,
        data: TrainingData,
        positions: Sequence[int],
        generator: torch.Generator,
        share: slice | None = None,
        total: int | None = None,
    ) -> tuple[torch.Tensor, list[str]]:
        """What a step trains on at `positions` (the rows `share` of a global batch of `total`): the U-Net's clean
        inputs (`to_model_space`) and their captions, read from the latent cache when there is one."""
        device = next(self.unet.parameters()).device
        if self.latent_cache is None:
            images, captions = data.take(positions)
            return self.to_model_space(images.to(device), generator, share, total), captions
        mean, std = self.latent_cache.posterior([data.index(p) for p in positions], device)
        return self._draw(mean, std, generator, share, total), data.captions(positions)

    def _draw(self, mean, std, generator, share, total) -> torch.Tensor:
        """A draw from the posteriors `(B, C, h, w)` with noise made for the global batch and sliced, scaled as
        diffusers' training scripts scale latents."""
        total = total or mean.shape[0]
        eps = torch.randn((total, *mean.shape[1:]), generator=generator)[share or slice(0, total)]
        latents = mean + std * eps.to(mean)
        shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
        return ((latents - shift) * float(self.vae.config.scaling_factor)).float()

    @torch.no_grad()
    def to_model_space(
        self, images: torch.Tensor, generator: torch.Generator, share: slice | None = None, total: int | None = None
    ) -> torch.Tensor:
        """Training images `(B, 3, R, R)` in [-1, 1] -> what the U-Net denoises: the images themselves, or latents
        (a draw from the VAE's posterior, scaled as diffusers' training scripts scale it). The images are the rows
        `share` of a global batch of `total`; the posterior's noise is drawn for the global batch and sliced."""
        if self.vae is None:
            return images
        parameter = next(self.vae.parameters())
        posterior = self.vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist
        return self._draw(posterior.mean, posterior.std, generator, share, total)

    def router_embedding(self, captions: Sequence[str], encoded: Conditioning) -> torch.Tensor:
        """The router's input for `captions` (a step's global batch). `encoded` is what the conditioner made of this
        process's rows: when those are all of `captions` and the conditioner's pooled embedding is the router
        encoder's, it is reused instead of encoding again."""
        if encoded.pooled is not None and self.conditioner_routes and len(encoded) == len(captions):
            return encoded.pooled
        return self.router_encoder.encode(list(captions)).pooled

    @property
    def conditioner_routes(self) -> bool:
        """Whether the conditioner's pooled embedding is the router encoder's (no second encoding needed)."""
        return self.conditioner.router_encoder is self.router_encoder

    def export_kwargs(self) -> dict[str, Any]:
        """What `export_bundle` carries beside the experts: the text adapter, or the pipeline's components."""
        return {"text_adapter": self.adapter, "pipeline": self.pipeline}


def load_training_teacher(
    folder: str | Path,
    device: str | torch.device = "cpu",
    text_encoder: EncoderConfig | None = None,
    router_encoder: EncoderConfig | None = None,
    dtype: torch.dtype | None = None,
) -> TrainingTeacher:
    """Load a teacher folder or a diffusers Stable Diffusion folder as a frozen training teacher (its U-Net, and a
    pipeline's VAE and text encoder, as `dtype`; default float32). `text_encoder` overrides a teacher folder's
    conditioning encoder; `router_encoder` is the router's sentence encoder (default: the teacher folder's own
    encoder, or all-MiniLM-L6-v2 for a pipeline)."""
    device = torch.device(device)
    if is_pipeline_folder(folder):
        parts = load_stable_diffusion(folder, device=device, dtype=dtype)
        spec, text_len = pipeline_teacher_spec(parts, router_encoder)
        routing = PromptEncoder(spec.text_encoder, device=device)
        conditioner = ClipConditioner(parts.tokenizer, parts.text_encoder, routing)
        scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        unet = parts.unet.requires_grad_(False)
        return TrainingTeacher(
            unet, spec, conditioner, routing, text_len, spec.resolution * scale, vae=parts.vae, pipeline=Path(folder)
        )
    unet, spec = load_teacher(folder, device=device, dtype=dtype)
    unet.requires_grad_(False)
    conditioner = load_teacher_conditioner(folder, spec, device, text_encoder=text_encoder)
    own = conditioner.encoder
    routing = own if router_encoder in (None, own.config) else PromptEncoder(router_encoder, device=device)
    return TrainingTeacher(
        unet, spec, conditioner, routing, spec.context_length, spec.resolution, adapter=conditioner.adapter
    )
