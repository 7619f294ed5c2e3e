"""How an image is made: prompts -> conditioning -> codes -> images, with everything a bundle holds resident (the
encoder, the router and one expert per code). The server's engine and evaluation both build on it.

A teacher folder (`aptp.formats.teacher`) loads as a one-code bundle whose only expert is the full teacher and whose
router sends every prompt to it: the unpruned model is served and measured through the same path as its pruned
codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.conditioning.conditioner import Conditioner
from aptp.conditioning.prompts import Conditioning
from aptp.formats.bundle import MANIFEST, BundleError, load_bundle_text_adapter, load_code_experts, read_manifest
from aptp.formats.teacher import load_teacher, load_teacher_conditioner
from aptp.sampling import SamplingConfig, make_sampler, prompt_map_channels, sample, unit_range_to_uint8
from pruning.space import ArchitectureSpace
from router.model import ROUTER_WEIGHTS, Router


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
        sampling (`SamplingConfig`): default `steps` and `guidance_scale`.
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
        sampling: SamplingConfig,
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
        self.sampling = sampling
        self.default_steps = sampling.steps
        self.default_guidance_scale = sampling.guidance_scale
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
        encoder = Conditioner.from_config(
            manifest.text_encoder, load_bundle_text_adapter(path, manifest, device=device), device=device
        )
        router = Router.load(
            path / "router",
            device=device,
            encoder=encoder.encoder,
            sha256=manifest.files.get(f"router/{ROUTER_WEIGHTS}"),
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
        encoder = load_teacher_conditioner(path, spec, device=device)
        space = ArchitectureSpace.from_unet(unet, text_len=encoder.context_length)
        macs = space.total_macs(spec.resolution)
        params = sum(p.numel() for p in unet.parameters())
        code = CodeInfo(code=0, macs=macs, params=params, training_share=1.0)
        return cls(
            encoder, None, [unet], [code], spec.scheduler_config, spec.resolution, spec.sampling, macs, "teacher"
        )

    # ------------------------------------------------------------------------------------------------- inference
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self.encoder.encode(list(prompts))

    def route(self, encoded: Conditioning) -> RoutedPrompts:
        """Each prompt's code; deterministic and independent of the other prompts in the call."""
        count = len(encoded)
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
                chunk = rows[start : start + batch_size]
                images[chunk] = self.generate(
                    code,
                    encoded.select(chunk),
                    seeds=[seeds[i] for i in chunk],
                    steps=steps,
                    guidance_scales=[guidance] * len(chunk),
                )
        return RoutedImages(images=images, codes=codes)

    @torch.no_grad()
    def generate(
        self,
        code: int,
        cond: Conditioning,
        seeds: Sequence[int],
        steps: int,
        guidance_scales: Sequence[float],
        negative: Conditioning | None = None,
    ) -> torch.Tensor:
        """Images `(N, 3, H, W)` uint8 from code `code`'s expert, one per row of `cond`; the unconditional branch
        reads `negative` (one row per image) or, when it is None, the empty prompt."""
        x = sample(
            self.experts[code],
            self.sampler,
            cond,
            self.empty_prompt if negative is None else negative,
            seeds,
            steps=steps,
            guidance_scale=list(guidance_scales),
            resolution=self.resolution,
        )
        return unit_range_to_uint8(x.float().cpu())
