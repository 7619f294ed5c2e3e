"""How an image is made: prompts -> conditioning -> codes -> denoised latents -> decoded images, with everything a
bundle holds resident (the text encoder, the router, one expert per code, the decoder). The server's engine, `aptp
eval` and `aptp generate` all use it; `RoutedPipeline.from_pretrained(...)(prompt)` is its diffusers-style API.

A teacher folder (`aptp.formats.teacher`) and a diffusers Stable Diffusion folder (`aptp.formats.diffusers`) load as
one-code bundles whose only expert is the full U-Net and whose router sends every prompt to it: the unpruned model
is served and measured through the same path as pruned codes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aptp.conditioning.clip import ClipConditioner
from aptp.conditioning.conditioner import Conditioner
from aptp.conditioning.encoder import PromptEncoder
from aptp.conditioning.prompts import Conditioning
from aptp.decoding import PixelDecoder, VaeDecoder, to_uint8, to_unit_range
from aptp.formats.bundle import (
    BundleError,
    load_bundle_text_adapter,
    load_code_experts,
    load_latent_components,
    read_manifest,
)
from aptp.formats.diffusers import STABLE_DIFFUSION_SAMPLING, load_stable_diffusion
from aptp.formats.kinds import folder_kind, not_a_model_folder
from aptp.formats.teacher import load_teacher, load_teacher_conditioner
from aptp.sampling import SamplingConfig, Trajectory, make_sampler, prompt_map_channels, run_to_end, unet_calls
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

    @classmethod
    def whole(cls, unet: nn.Module, text_len: int, resolution: int) -> CodeInfo:
        """The one code of an unpruned U-Net (a teacher or a diffusers folder served as it is)."""
        macs = ArchitectureSpace.from_unet(unet, text_len=text_len).total_macs(resolution)
        return cls(code=0, macs=macs, params=sum(p.numel() for p in unet.parameters()), training_share=1.0)


QUALITY_TIERS = ("fast", "balanced", "best")


class BudgetError(ValueError):
    """A compute budget that no code can meet, or that is malformed; `field` names the request field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True)
class ComputeBudget:
    """What one request may spend: `max_macs_ratio` caps the MACs of a U-Net call at that fraction of the teacher's
    (the router's most preferred code within the cap serves it), and a named `quality` tier picks among the codes
    within it (all of them without a cap): `"fast"` the cheapest, `"balanced"` the router's choice, `"best"` the
    costliest. No budget is the router's choice.
    """

    max_macs_ratio: float | None = None
    quality: str | None = None

    def __post_init__(self):
        if self.max_macs_ratio is not None and not self.max_macs_ratio > 0:
            raise BudgetError("max_macs_ratio", f"must be above 0 (got {self.max_macs_ratio})")
        if self.quality is not None and self.quality not in QUALITY_TIERS:
            raise BudgetError("quality", f"must be one of {', '.join(QUALITY_TIERS)} (got {self.quality!r})")

    @property
    def is_router_choice(self) -> bool:
        return self.max_macs_ratio is None and self.quality in (None, "balanced")


@dataclass(frozen=True)
class RoutedPrompts:
    """`codes[i]` and `scores[i]` (similarity to the chosen code) of prompt i; `rankings[i]`, every code in the
    router's order of preference for it (its first choice first), and `all_scores[i]`, its similarity to each code."""

    codes: list[int]
    scores: list[float]
    rankings: list[list[int]]
    all_scores: list[list[float]]


@dataclass(frozen=True)
class RoutedImages:
    """`images[i]` (`(3, H, W)` uint8) for prompt i, made by code `codes[i]`."""

    images: torch.Tensor
    codes: list[int]


@dataclass
class RoutedPipelineOutput:
    """What `RoutedPipeline.__call__` returns.

    Parameters:
        images (`list[PIL.Image]`, `np.ndarray` or `torch.Tensor`): `num_images_per_prompt` images per prompt, prompt
            by prompt; arrays and tensors are float in [0, 1], `(N, H, W, 3)` and `(N, 3, H, W)`.
        codes (`list[int]`): the code each prompt was routed to.
        router_scores (`list[float]`): the router's similarity to that code.
        macs_per_call (`list[int]`): MACs of one U-Net call of each prompt's code.
        total_macs (`int`): everything the call spent: U-Net calls, text encoding and adapter, decoding.
    """

    images: Any
    codes: list[int]
    router_scores: list[float]
    macs_per_call: list[int]
    total_macs: int


Seeds = Sequence[int | torch.Generator]
TextConditioner = Conditioner | ClipConditioner
Decoder = PixelDecoder | VaeDecoder


class RoutedPipeline:
    """Text conditioning + router + experts + sampler + decoder, all resident on one device.

    Parameters:
        encoder (`Conditioner` or `ClipConditioner`): what the U-Nets read (the embedded domain's frozen encoder
            and text adapter, or a pipeline's CLIP text encoder) and the pooled embedding the router reads.
        router (`Router`, *optional*): None for a one-code pipeline (a teacher or a diffusers pipeline folder).
        experts (`list[nn.Module]`): the U-Net of each code; empty for a pipeline loaded to encode and route only
            (`from_pretrained(..., load_experts=False)`), which cannot generate.
        codes (`list[CodeInfo]`): their description.
        scheduler_config (`dict`): the training noise schedule (samplers are built from it).
        resolution (`int`): image size in pixels (the U-Nets run at `resolution // decoder.scale_factor`).
        sampling (`SamplingConfig`): default `steps` and `guidance_scale`.
        teacher_macs (`int`): MACs of one call of the unpruned U-Net.
        source (`str`): `"bundle"`, `"teacher"` or `"pipeline"`.
        decoder (`PixelDecoder` or `VaeDecoder`, *optional*): latents to pixels; default the identity.
    """

    def __init__(
        self,
        encoder: TextConditioner,
        router: Router | None,
        experts: list[nn.Module],
        codes: list[CodeInfo],
        scheduler_config: dict[str, Any],
        resolution: int,
        sampling: SamplingConfig,
        teacher_macs: int,
        source: str,
        decoder: Decoder | None = None,
    ):
        if router is None and len(experts) != 1:
            raise ValueError("a pipeline without a router has exactly one expert")
        if decoder is None and not experts:
            raise ValueError("a pipeline without experts needs its decoder given")
        decoder = decoder or PixelDecoder(experts[0].config.out_channels)
        made = encoder.map_channels
        for code, expert in enumerate(experts):
            if prompt_map_channels(expert) != made:
                raise ValueError(
                    f"code {code}'s U-Net takes a {prompt_map_channels(expert)}-channel prompt map, the text adapter "
                    f"makes {made}"
                )
            if expert.config.out_channels != decoder.latent_channels:
                raise ValueError(
                    f"code {code}'s U-Net makes {expert.config.out_channels} channels, the decoder reads "
                    f"{decoder.latent_channels}"
                )
        if resolution % decoder.scale_factor:
            raise ValueError(f"resolution {resolution} is not a multiple of the decoder's {decoder.scale_factor}")
        self.encoder = encoder
        self.router = router
        self.experts = [expert.eval() for expert in experts]
        self.codes = codes
        self.sampler = make_sampler(scheduler_config)
        self.resolution = resolution
        self.latent_size = resolution // decoder.scale_factor
        self.decoder = decoder
        self.sampling = sampling
        self.teacher_macs = teacher_macs
        self.source = source
        self.empty_prompt = encoder.encode([""])

    @property
    def num_codes(self) -> int:
        return len(self.codes)

    @property
    def default_steps(self) -> int:
        return self.sampling.steps

    @property
    def default_guidance_scale(self) -> float:
        return self.sampling.guidance_scale

    def _defaults(self, steps: int | None, guidance_scale: float | None) -> tuple[int, float]:
        """A call's steps and guidance: as asked, else the model's defaults."""
        return steps or self.sampling.steps, self.sampling.guidance_scale if guidance_scale is None else guidance_scale

    @property
    def adapter_macs_per_prompt(self) -> int:
        return self.encoder.adapter_macs_per_prompt

    @property
    def text_encoder_macs_per_prompt(self) -> int:
        """MACs of the conditioning text encoder for one prompt (a pipeline's CLIP; 0 for the embedded domain's
        frozen sentence encoder, which is not counted)."""
        return self.encoder.text_encoder_macs_per_prompt

    @property
    def decoder_macs_per_image(self) -> int:
        """MACs of decoding one image (the VAE decoder; 0 in pixel space)."""
        return self.decoder.macs_per_image

    @property
    def device(self) -> torch.device:
        return next((self.experts[0] if self.experts else self.router).parameters()).device

    # --------------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        load_experts: bool = True,
    ) -> RoutedPipeline:
        """Load a bundle folder (`manifest.json`), a teacher folder (`teacher.json`) or a diffusers Stable Diffusion
        pipeline folder (`model_index.json`), verifying what can be verified; errors name the file.
        `load_experts=False` loads a bundle to encode, route and count costs only, without its codes' U-Nets (what
        a Ray Serve ingress needs); a one-code folder's U-Net is loaded whatever it says."""
        path = Path(path)
        kind = folder_kind(path)
        if kind == "teacher":
            return cls._from_teacher(path, device, dtype)
        if kind == "pipeline":
            return cls._from_diffusers(path, device, dtype)
        if kind is None:
            raise BundleError(path, not_a_model_folder(path).removeprefix(f"{path}: "))
        manifest = read_manifest(path)
        decoder, resolution = None, manifest.resolution
        if manifest.latent is not None:  # cut from a diffusers pipeline: its own CLIP and VAE, MiniLM routes
            tokenizer, text_encoder, vae = load_latent_components(path, manifest, device=device, dtype=dtype)
            router_encoder = PromptEncoder(manifest.text_encoder, device=device)
            encoder = ClipConditioner(tokenizer, text_encoder, router_encoder)
            decoder = VaeDecoder(vae, manifest.resolution)
            resolution = manifest.resolution * decoder.scale_factor
        else:
            adapter = load_bundle_text_adapter(path, manifest, device=device)
            encoder = Conditioner.from_config(manifest.text_encoder, adapter, device=device)
            router_encoder = encoder.encoder
        router = Router.load(
            path / "router",
            device=device,
            encoder=router_encoder,
            sha256=manifest.files.get(f"router/{ROUTER_WEIGHTS}"),
        )
        if router.config.num_codes != manifest.num_codes:
            raise BundleError(
                path / "router", f"router has {router.config.num_codes} codes, manifest {manifest.num_codes}"
            )
        experts = load_code_experts(path, manifest, device=device, dtype=dtype) if load_experts else []
        if decoder is None and not load_experts:
            decoder = PixelDecoder(manifest.teacher_config["out_channels"])
        codes = [CodeInfo(c.code, c.macs, c.params, c.training_share) for c in manifest.codes]
        return cls(
            encoder,
            router,
            experts,
            codes,
            manifest.scheduler_config,
            resolution,
            manifest.sampling,
            manifest.teacher_macs,
            source="bundle",
            decoder=decoder,
        )

    load = from_pretrained

    @classmethod
    def _from_teacher(cls, path: Path, device, dtype) -> RoutedPipeline:
        unet, spec = load_teacher(path, device=device, dtype=dtype)
        encoder = load_teacher_conditioner(path, spec, device=device)
        code = CodeInfo.whole(unet, encoder.context_length, spec.resolution)
        return cls(
            encoder, None, [unet], [code], spec.scheduler_config, spec.resolution, spec.sampling, code.macs, "teacher"
        )

    @classmethod
    def _from_diffusers(cls, path: Path, device, dtype) -> RoutedPipeline:
        parts = load_stable_diffusion(path, device=device, dtype=dtype)
        encoder = ClipConditioner(parts.tokenizer, parts.text_encoder)
        latent_size = int(parts.unet.config.sample_size)
        decoder = VaeDecoder(parts.vae, latent_size)
        code = CodeInfo.whole(parts.unet, encoder.context_length, latent_size)
        resolution, sampling = latent_size * decoder.scale_factor, STABLE_DIFFUSION_SAMPLING
        return cls(
            encoder,
            None,
            [parts.unet],
            [code],
            parts.scheduler_config,
            resolution,
            sampling,
            code.macs,
            "pipeline",
            decoder,
        )

    def to(self, device: str | torch.device) -> RoutedPipeline:
        """Move every component (experts, text encoder and adapter, router, decoder) to `device`."""
        self.experts = [expert.to(device) for expert in self.experts]
        self.encoder.to(device)
        if self.router is not None:
            self.router.to(device)
        self.decoder.to(device)
        self.empty_prompt = self.empty_prompt.to(device)
        return self

    def to_memory_format(self, memory_format: torch.memory_format) -> RoutedPipeline:
        """Keep the experts' convolution weights in `memory_format`. With `torch.channels_last` (NHWC) the U-Nets'
        convolutions run without layout conversions in oneDNN on CPU and cuDNN on CUDA; results agree with the
        default layout to float rounding. Activations follow the weights' layout, so inputs need no change."""
        self.experts = [expert.to(memory_format=memory_format) for expert in self.experts]
        return self

    def compile_experts(self, mode: str = "default") -> RoutedPipeline:
        """Wrap every expert in `torch.compile` (`mode`: "default", "reduce-overhead" (CUDA graphs, one per batch
        shape, on CUDA) or "max-autotune"). Compilation is lazy: each expert compiles on its first call, and again for
        a new kind of shape, so run `server.engine.Engine.warm_up` before serving. The batch dimension is compiled
        dynamic, so the batch sizes a server forms reuse one graph (batch 1 gets its own: a size of 1 is always
        specialised). Results agree with eager execution to float rounding. Call after `to` and `to_memory_format`:
        a compiled expert is guarded on its weights' device and layout."""
        self.experts = [torch.compile(expert, mode=mode, dynamic=True) for expert in self.experts]
        return self

    # ------------------------------------------------------------------------------------------------- inference
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        return self.encoder.encode(list(prompts))

    def route(self, encoded: Conditioning, budget: ComputeBudget | None = None) -> RoutedPrompts:
        """Each prompt's code (within `budget`, when given); deterministic and independent of the other prompts in
        the call."""
        count = len(encoded)
        if self.router is None:
            self.check_budget(budget)
            return RoutedPrompts([0] * count, [1.0] * count, [[0]] * count, [[1.0]] * count)
        routing = self.router.route_embeddings(encoded.pooled)
        rankings, all_scores = routing.rankings.tolist(), routing.all_scores.tolist()
        codes = [self.choose(ranking, budget) for ranking in rankings]
        scores = [row[code] for row, code in zip(all_scores, codes, strict=True)]
        return RoutedPrompts(codes, scores, rankings, all_scores)

    def check_budget(self, budget: ComputeBudget | None) -> None:
        """Raise `BudgetError` when no code meets `budget` (a cap below the cheapest code): a property of the
        bundle, so it is known before any prompt is routed."""
        if budget is None or budget.max_macs_ratio is None:
            return
        cheapest = min(info.macs for info in self.codes)
        if not any(self._within(info.code, budget) for info in self.codes):
            raise BudgetError(
                "max_macs_ratio",
                f"no code costs at most {budget.max_macs_ratio:g} of the teacher's MACs per call; the cheapest "
                f"costs {cheapest / self.teacher_macs:.3f}",
            )

    def choose(self, ranking: Sequence[int], budget: ComputeBudget | None) -> int:
        """The code that serves a prompt of router preference `ranking` within `budget` (see `ComputeBudget`)."""
        if budget is None or budget.is_router_choice:
            return ranking[0]
        self.check_budget(budget)
        within = [code for code in ranking if self._within(code, budget)]
        if budget.quality in ("fast", "best"):  # the extreme cost within the cap, the router's order breaking ties
            costs = [self.codes[code].macs for code in within]
            target = min(costs) if budget.quality == "fast" else max(costs)
            return next(code for code, cost in zip(within, costs, strict=True) if cost == target)
        return within[0]

    def _within(self, code: int, budget: ComputeBudget) -> bool:
        # A hair of slack: a cap of exactly a code's ratio (macs / teacher_macs, as a float) admits that code.
        return budget.max_macs_ratio is None or self.codes[code].macs <= budget.max_macs_ratio * self.teacher_macs * (
            1 + 1e-9
        )

    def cheaper(self, ranking: Sequence[int], code: int) -> list[int]:
        """The codes that cost less than `code`, in the router's order of preference `ranking`: what an overloaded
        server may serve instead (`server.settings.Settings.degrade_when_full`)."""
        return [other for other in ranking if self.codes[other].macs < self.codes[code].macs]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        batch_size: int = 32,
        max_macs_ratio: float | None = None,
        quality: str | None = None,
    ) -> RoutedPipelineOutput:
        """Generate `num_images_per_prompt` images for each prompt (a string is one prompt) with its routed code.

        Noise comes from `generator` (one per image, or one drawn from image after image), else from `seed`
        (image i of the call gets `seed + i`, as the server does), else from a random seed. `negative_prompt` (one,
        or one per prompt) replaces the empty prompt in the unconditional branch. `output_type` is `"pil"`, `"np"`
        or `"pt"`. `max_macs_ratio` or `quality` caps what each prompt's code may cost (`ComputeBudget`)."""
        budget = ComputeBudget(max_macs_ratio, quality)
        self.check_budget(budget)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt: give at least one prompt")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        count = len(prompts) * num_images_per_prompt
        if isinstance(generator, torch.Generator):
            seeds: list[int | torch.Generator] = [generator] * count
        elif generator is not None:
            seeds = list(generator)
            if len(seeds) != count:
                raise ValueError(f"{len(seeds)} generators for {count} images")
        else:
            first = int(torch.randint(0, 2**31 - 1, ()).item()) if seed is None else seed
            seeds = [first + i for i in range(count)]
        steps, guidance = self._defaults(num_inference_steps, guidance_scale)
        encoded = self.encode(prompts)
        routed = self.route(encoded, budget)
        negative = self.encode(negatives) if negatives is not None else None
        per_image = [i for i in range(len(prompts)) for _ in range(num_images_per_prompt)]
        images = self._generate_routed(encoded, negative, routed.codes, per_image, seeds, steps, guidance, batch_size)
        macs = [self.codes[c].macs for c in routed.codes]
        calls = unet_calls(steps, [guidance])
        text = (self.text_encoder_macs_per_prompt + self.adapter_macs_per_prompt) * (
            len(prompts) + len(negatives or [])
        )
        total = sum(macs[i] * calls for i in per_image) + text + self.decoder_macs_per_image * count
        return RoutedPipelineOutput(_as_output(images, output_type), routed.codes, routed.scores, macs, total)

    @torch.no_grad()
    def run(
        self,
        prompts: Sequence[str],
        seeds: Seeds,
        steps: int | None = None,
        guidance_scale: float | None = None,
        batch_size: int = 32,
        budget: ComputeBudget | None = None,
    ) -> RoutedImages:
        """One uint8 image per prompt (`seeds[i]` for prompt i), each from its routed code (within `budget`),
        `batch_size` images per U-Net batch: what `aptp eval` and `aptp generate` run."""
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        steps, guidance = self._defaults(steps, guidance_scale)
        encoded = self.encode(prompts)
        codes = self.route(encoded, budget).codes
        rows = list(range(len(prompts)))
        images = self._generate_routed(encoded, None, codes, rows, list(seeds), steps, guidance, batch_size)
        return RoutedImages(images=to_uint8(images), codes=codes)

    def _generate_routed(
        self,
        encoded: Conditioning,
        negative: Conditioning | None,
        codes: list[int],
        image_prompts: list[int],
        seeds: list[int | torch.Generator],
        steps: int,
        guidance: float,
        batch_size: int,
    ) -> torch.Tensor:
        """Model-space images `(N, 3, H, W)` on the CPU, image n of prompt `image_prompts[n]`: images are grouped by
        code into batches of at most `batch_size` and come back in order."""
        images = torch.empty(len(image_prompts), 3, self.resolution, self.resolution)
        for code in sorted(set(codes)):
            todo = [n for n, p in enumerate(image_prompts) if codes[p] == code]
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                rows = [image_prompts[n] for n in chunk]
                images[chunk] = self.generate(
                    code,
                    encoded.select(rows),
                    seeds=[seeds[n] for n in chunk],
                    steps=steps,
                    guidance_scales=[guidance] * len(chunk),
                    negative=negative.select(rows) if negative is not None else None,
                    output="model",
                )
        return images

    @torch.no_grad()
    def generate(
        self,
        code: int,
        cond: Conditioning,
        seeds: Seeds,
        steps: int,
        guidance_scales: Sequence[float],
        negative: Conditioning | None = None,
        output: str = "uint8",
    ) -> torch.Tensor:
        """Images `(N, 3, H, W)` from code `code`'s expert, one per row of `cond` (noise from `seeds[i]`: a seed or a
        generator), decoded; the unconditional branch reads `negative` (one row per image) or, when it is None, the
        empty prompt. `output`: `"uint8"` (what is served) or `"model"` (float, [-1, 1] unclipped), on the CPU."""
        trajectory = self.trajectory(code, cond, seeds, steps, guidance_scales, negative)
        return self.decode(run_to_end(self._expert(code), trajectory), output)

    def trajectory(
        self,
        code: int,
        cond: Conditioning,
        seeds: Seeds,
        steps: int,
        guidance_scales: Sequence[float],
        negative: Conditioning | None = None,
    ) -> Trajectory:
        """The denoising of `cond`'s rows by code `code`'s expert, not yet begun (`aptp.sampling.advance` steps it,
        `decode` turns its result into images): `generate` one step at a time, for step-level batching."""
        uncond = self.empty_prompt if negative is None else negative
        return Trajectory(
            self._expert(code), self.sampler, cond, uncond, seeds, steps, list(guidance_scales), self.latent_size
        )

    def _expert(self, code: int) -> nn.Module:
        if not self.experts:
            raise RuntimeError("this pipeline was loaded to encode and route only (load_experts=False): no U-Net")
        return self.experts[code]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output: str = "uint8") -> torch.Tensor:
        """A finished trajectory's samples as images on the CPU: `"uint8"` or `"model"` (as in `generate`)."""
        images = self.decoder.decode(latents).float().cpu()
        return to_uint8(images) if output == "uint8" else images


def _as_output(images: torch.Tensor, output_type: str):
    """Model-space images as diffusers returns them: PIL images, or float [0, 1] arrays / tensors."""
    unit = to_unit_range(images)
    if output_type == "pt":
        return unit
    array = unit.permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((image * 255).round().astype("uint8")) for image in array]
