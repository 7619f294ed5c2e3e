"""Prompts -> codes -> images with everything a bundle holds resident: the encoder, the router and one expert per
code. The server's engine and evaluation both build on it.

A teacher folder (pruning.teacher) loads as a one-code bundle whose only expert is the full teacher and whose router
sends every prompt to it: the unpruned model is served and measured through the same path as its pruned codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pruning.bundle import MANIFEST, BundleError, load_bundle_text_adapter, load_code_experts, read_manifest
from pruning.diffusion import make_sampler, prompt_map_channels, sample, unit_range_to_uint8
from pruning.space import ArchitectureSpace
from pruning.teacher import load_teacher, load_text_adapter

from .encoder import Conditioner, EncodedPrompts, EncoderConfig, PromptEncoder
from .model import ROUTER_WEIGHTS, Router


@dataclass(frozen=True)
class CodeInfo:
    """What a client may know about one code.

    Parameters:
        code (`int`): its index.
        macs (`int`): MACs of one U-Net call (batch 1, one branch of classifier-free guidance).
        params (`int`): parameters of its expert.
        training_share (`float`): share of training prompts routed to it.
    """

    code: int
    macs: int
    params: int
    training_share: float


@dataclass(frozen=True)
class RoutedPrompts:
    """`codes[i]` and `scores[i]` (similarity to the chosen code) of prompt i."""

    codes: list[int]
    scores: list[float]


@dataclass(frozen=True)
class RoutedImages:
    """`images[i]` (`(3, H, W)` uint8) for prompt i, made by code `codes[i]`."""

    images: torch.Tensor
    codes: list[int]


class RoutedPipeline:
    """Encoder + router + experts + sampler, all resident on one device.

    Parameters:
        encoder (`Conditioner`): the frozen text encoder and the teacher's text adapter, if it has one (token
            states for the U-Nets, the encoder's pooled embedding for the router).
        router (`Router`, *optional*): None for a one-code pipeline (a teacher folder).
        experts (`list[nn.Module]`): the U-Net of each code.
        codes (`list[CodeInfo]`): their description.
        scheduler_config (`dict`): the training noise schedule (samplers are built from it).
        resolution (`int`): image size.
        sampling (`dict`): default `steps` and `guidance_scale`.
        teacher_macs (`int`): MACs of one call of the unpruned U-Net.
        source (`str`): `"bundle"` or `"teacher"`.
    """

    def __init__(
        self,
        encoder: Conditioner,
        router: Router | None,
        experts: list[nn.Module],
        codes: list[CodeInfo],
        scheduler_config: dict[str, Any],
        resolution: int,
        sampling: dict[str, Any],
        teacher_macs: int,
        source: str,
    ):
        if router is None and len(experts) != 1:
            raise ValueError("a pipeline without a router has exactly one expert")
        adapter = encoder.adapter
        made = adapter.config.map_channels if adapter is not None else 0
        for code, expert in enumerate(experts):
            if prompt_map_channels(expert) != made:
                raise ValueError(
                    f"code {code}'s U-Net takes a {prompt_map_channels(expert)}-channel prompt map, the text adapter "
                    f"makes {made}"
                )
        self.encoder = encoder
        self.router = router
        self.experts = [expert.eval() for expert in experts]
        self.codes = codes
        self.sampler = make_sampler(scheduler_config)
        self.resolution = resolution
        self.default_steps = int(sampling.get("steps", 25))
        self.default_guidance_scale = float(sampling.get("guidance_scale", 4.0))
        self.teacher_macs = teacher_macs
        self.source = source
        self.empty_prompt = encoder.encode([""])

    @property
    def num_codes(self) -> int:
        return len(self.codes)

    @property
    def adapter_macs_per_prompt(self) -> int:
        return self.encoder.adapter_macs_per_prompt

    @classmethod
    def load(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> RoutedPipeline:
        """Load a bundle folder (with `manifest.json`) or a teacher folder (with `teacher.json`), verifying
        checksums; errors name the file."""
        path = Path(path)
        if (path / "teacher.json").is_file() and not (path / MANIFEST).is_file():
            return cls._from_teacher(path, device, dtype)
        manifest = read_manifest(path)  # names the folder or manifest when neither kind is found
        frozen = PromptEncoder(EncoderConfig(**manifest.text_encoder), device=device)
        encoder = Conditioner(frozen, load_bundle_text_adapter(path, manifest, device=device))
        router = Router.load(
            path / "router", device=device, encoder=frozen, sha256=manifest.files.get(f"router/{ROUTER_WEIGHTS}")
        )
        if router.config.num_codes != manifest.num_codes:
            raise BundleError(
                path / "router", f"router has {router.config.num_codes} codes, manifest {manifest.num_codes}"
            )
        experts = load_code_experts(path, manifest, device=device, dtype=dtype)
        codes = [CodeInfo(c.code, c.macs, c.params, c.training_share) for c in manifest.codes]
        return cls(
            encoder,
            router,
            experts,
            codes,
            manifest.scheduler_config,
            manifest.resolution,
            manifest.sampling,
            manifest.teacher_macs,
            source="bundle",
        )

    @classmethod
    def _from_teacher(cls, path: Path, device, dtype) -> RoutedPipeline:
        unet, spec = load_teacher(path, device=device, dtype=dtype)
        frozen = PromptEncoder(EncoderConfig(**spec.text_encoder), device=device)
        encoder = Conditioner(frozen, load_text_adapter(path, device=device))
        space = ArchitectureSpace.from_unet(unet, text_len=encoder.context_length)
        macs = space.total_macs(spec.resolution)
        params = sum(p.numel() for p in unet.parameters())
        code = CodeInfo(code=0, macs=macs, params=params, training_share=1.0)
        return cls(
            encoder, None, [unet], [code], spec.scheduler_config, spec.resolution, spec.sampling, macs, "teacher"
        )

    # ------------------------------------------------------------------------------------------------- inference
    def encode(self, prompts: Sequence[str]) -> EncodedPrompts:
        return self.encoder.encode(list(prompts))

    def route(self, encoded: EncodedPrompts) -> RoutedPrompts:
        """Each prompt's code; deterministic and independent of the other prompts in the call."""
        count = encoded.pooled.shape[0]
        if self.router is None:
            return RoutedPrompts(codes=[0] * count, scores=[1.0] * count)
        routing = self.router.route_embeddings(encoded.pooled)
        return RoutedPrompts(codes=[int(c) for c in routing.codes], scores=[float(s) for s in routing.scores])

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 32,
    ) -> RoutedImages:
        """Route each prompt and generate one image per prompt with its code's expert, `batch_size` images per
        U-Net batch (prompts are grouped by code; the images come back in prompt order)."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        steps = steps or self.default_steps
        guidance = self.default_guidance_scale if guidance_scale is None else guidance_scale
        encoded = self.encode(prompts)
        codes = self.route(encoded).codes
        images = torch.empty(len(prompts), 3, self.resolution, self.resolution, dtype=torch.uint8)
        for code in sorted(set(codes)):
            rows = [i for i, c in enumerate(codes) if c == code]
            for start in range(0, len(rows), batch_size):
                chunk = torch.tensor(rows[start : start + batch_size])
                images[chunk] = self.generate(
                    code,
                    encoded.tokens[chunk],
                    encoded.mask[chunk],
                    seeds=[seeds[i] for i in chunk.tolist()],
                    steps=steps,
                    guidance_scales=[guidance] * len(chunk),
                    prompt_map=None if encoded.prompt_map is None else encoded.prompt_map[chunk],
                )
        return RoutedImages(images=images, codes=codes)

    @torch.no_grad()
    def generate(
        self,
        code: int,
        tokens: torch.Tensor,
        mask: torch.Tensor,
        seeds: Sequence[int],
        steps: int,
        guidance_scales: Sequence[float],
        negative_tokens: torch.Tensor | None = None,
        negative_mask: torch.Tensor | None = None,
        prompt_map: torch.Tensor | None = None,
        negative_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Images `(N, 3, H, W)` uint8 from code `code`'s expert, one per row of `tokens` `(N, L, D)` (and of
        `prompt_map`, when the text adapter makes one); the unconditional branch uses `negative_tokens` (one row per
        image, with `negative_map`) or the empty prompt."""
        if negative_tokens is None:
            negative_tokens, negative_mask = self.empty_prompt.tokens, self.empty_prompt.mask
            negative_map = self.empty_prompt.prompt_map
        x = sample(
            self.experts[code],
            self.sampler,
            tokens,
            mask,
            negative_tokens,
            negative_mask,
            seeds,
            steps=steps,
            guidance_scale=list(guidance_scales),
            resolution=self.resolution,
            cond_map=prompt_map,
            uncond_map=negative_map,
        )
        return unit_range_to_uint8(x.float().cpu())
