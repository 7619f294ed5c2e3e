"""`aptp train teacher`: train the embedded domain's pixel-space U-Net from scratch.

Denoising loss with min-SNR-gamma weighting, prompt dropout (for classifier-free guidance), EMA weights, AdamW with
warm-up and cosine decay. The run folder holds `log.jsonl` (loss per step), `checkpoint/` (written every few
minutes and at the end; a killed run resumes from it exactly: data, noise and timesteps are functions of the step),
and the exported teacher folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm import tqdm

from aptp.conditioning.adapter import AdapterShape, TextAdapter
from aptp.conditioning.encoder import EncoderConfig, PromptEncoder
from aptp.conditioning.prompts import Conditioning
from aptp.formats.teacher import TeacherSpec, save_teacher
from aptp.sampling import SamplingConfig, denoise, input_layout

from .data.labels import collate, images_to_unit_range
from .data.shapes import ShapesDomain
from .layout import LAYOUT_READS, PromptLayoutHead, layout_loss, pretrain_adapter, rounded_accuracy
from .noise import NoisyBatch
from .run import RunSettings, TrainingRun, check_finite, warmup_cosine


class UNetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sample_size: int = 32
    # in_channels = out_channels + 2 feeds each pixel's row and column to the model (see aptp.sampling).
    in_channels: int = 5
    out_channels: int = 3
    block_out_channels: list[int] = [32, 64, 96]
    layers_per_block: int = 1
    down_block_types: list[str] = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    up_block_types: list[str] = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    attention_head_dim: int | list[int] = 8
    norm_num_groups: int = 8

    @model_validator(mode="after")
    def _known_input_layout(self) -> UNetSettings:
        input_layout(self.in_channels, self.out_channels)  # names the supported layouts when this is none
        return self


class AdapterSettings(AdapterShape):
    """A trainable text adapter between the frozen encoder and the U-Net: its shape (`AdapterShape`; with a prompt
    map, the U-Net's `in_channels` must count the map's channels) and how it is trained. With `layout_weight` > 0, a
    layout read-out (`training.layout`) trained on the adapter's states adds its loss, times this weight, to the
    denoising loss; the read-out is used in training only and not exported. With `summary_tokens` it classifies the
    adapter's summary tokens themselves, one per grid cell and one for the scene (so there must be that many).
    With `pretrain_steps` > 0, the adapter and the read-out are first trained on the layout loss alone
    (`training.layout.pretrain_adapter`: `pretrain_captions` captions encoded once, batches of
    `pretrain_batch_size`, learning rate `pretrain_lr`), before the U-Net's first step."""

    layout_weight: float = Field(0.0, ge=0.0)
    pretrain_steps: int = Field(0, ge=0)
    pretrain_captions: int = Field(32768, ge=1)
    pretrain_batch_size: int = Field(128, ge=1)
    pretrain_lr: float = Field(2e-3, gt=0.0)

    @model_validator(mode="after")
    def _summary_tokens_fit_the_layout_read(self) -> AdapterSettings:
        if self.summary_tokens and self.has_layout_read and self.summary_tokens != LAYOUT_READS:
            raise ValueError(
                f"summary_tokens: the layout read-out classifies one summary token per grid cell plus one for the "
                f"scene, so it must be {LAYOUT_READS} (or 0), not {self.summary_tokens}"
            )
        if self.map_grid and self.has_layout_read and self.map_grid**2 != LAYOUT_READS - 1:
            raise ValueError(
                f"map_grid: the layout read-out's cell tokens make the map, so it must be the domain's grid "
                f"({LAYOUT_READS - 1} cells), not {self.map_grid}x{self.map_grid}"
            )
        self.adapter_config(token_dim=1)  # the adapter's own checks (map and summary tokens), named by field
        return self

    @property
    def has_layout_read(self) -> bool:
        return self.layout_weight > 0 or self.pretrain_steps > 0


class NoiseSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = Field("v_prediction", pattern="^(epsilon|v_prediction)$")


class OptimSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int = Field(4000, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(6e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    weight_decay: float = Field(0.01, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    prompt_dropout: float = Field(0.1, ge=0, lt=1)
    min_snr_gamma: float = Field(5.0, gt=0)


class TeacherConfig(RunSettings):
    """Config of `aptp train teacher` (see configs/shapes/teacher.yaml)."""

    out: str = "runs/teacher-shapes"
    export: str = "bundles/shapes/teacher"
    unet: UNetSettings = UNetSettings()
    text_encoder: EncoderConfig = EncoderConfig(max_length=40)
    text_adapter: AdapterSettings | None = None
    noise: NoiseSettings = NoiseSettings()
    optim: OptimSettings = OptimSettings()
    sampling: SamplingConfig = SamplingConfig()
    export_dtype: str = Field("float16", pattern="^(float16|bfloat16|float32)$")

    @model_validator(mode="after")
    def _unet_takes_the_prompt_map(self) -> TeacherConfig:
        made = self.text_adapter.map_channels if self.text_adapter is not None else 0
        taken = input_layout(self.unet.in_channels, self.unet.out_channels)[1]
        if taken != made:
            raise ValueError(
                f"unet.in_channels: {self.unet.in_channels} leaves {taken} prompt-map channels after the image and "
                f"coordinate planes, but the text adapter makes {made} (text_adapter.map_channels)"
            )
        return self


def build_unet(config: TeacherConfig, cross_attention_dim: int) -> UNet2DConditionModel:
    return UNet2DConditionModel(**config.unet.model_dump(), cross_attention_dim=cross_attention_dim)


def diffusion_loss(unet, scheduler: DDPMScheduler, x0, cond: Conditioning, generator, gamma: float) -> torch.Tensor:
    """Min-SNR-weighted denoising loss for one batch; noise and timesteps come from `generator`."""
    batch = NoisyBatch.make(scheduler, x0, generator, gamma)
    pred = denoise(unet, batch.noisy, batch.timesteps, cond).sample
    per_sample = F.mse_loss(pred.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (batch.weight * per_sample).mean()


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, param in model.named_parameters():
            self.shadow[name].lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def reset(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            self.shadow[name].copy_(param)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for name, param in model.named_parameters():
            param.copy_(self.shadow[name])


def train_teacher(config: TeacherConfig) -> Path:
    """Run (or resume) teacher training; exports the EMA model to `config.export` when done."""
    device = torch.device(config.device)
    encoder = PromptEncoder(config.text_encoder, device=device)
    torch.manual_seed(config.seed)  # the initial weights are part of what the seed reproduces
    settings = config.text_adapter
    adapter, layout, text_side = None, None, torch.nn.ModuleDict()
    if settings is not None:
        adapter = text_side["adapter"] = TextAdapter(settings.adapter_config(encoder.token_dim))
        if settings.has_layout_read:
            layout = text_side["layout"] = PromptLayoutHead(settings.width, summary=settings.summary_tokens > 0)
        text_side.to(device)
    context_dim = adapter.config.out_dim if adapter is not None else encoder.token_dim
    unet = build_unet(config, context_dim).to(device).to(memory_format=torch.channels_last)
    # One module holds what is trained, so the optimiser, the EMA and the checkpoint see the adapter too; a teacher
    # without one keeps the U-Net's own parameter names (and its older checkpoints).
    trained = unet if adapter is None else torch.nn.ModuleDict({"unet": unet, **text_side})
    scheduler = DDPMScheduler(**config.noise.model_dump())
    optim = config.optim
    optimizer = torch.optim.AdamW(trained.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
    ema = EMA(trained, optim.ema_decay)
    domain = ShapesDomain(seed=config.seed, split="train", phrasing=config.phrasing)
    run = TrainingRun(config, {"unet": trained, "ema": ema.shadow}, optimizer)
    start = run.resume()
    if start == 0 and settings is not None and settings.pretrain_steps > 0:
        unseen = pretrain_adapter(
            adapter,
            layout,
            encoder,
            domain,
            settings.pretrain_steps,
            settings.pretrain_captions,
            settings.pretrain_batch_size,
            settings.pretrain_lr,
            config.seed,
            run.log,
        )
        run.log({"pretrained": settings.pretrain_steps, "layout_accuracy_unseen_tier3": unseen})
        print(f"text adapter pre-trained; read-out on unseen three-object captions: {unseen}")
        ema.reset(trained)  # the average starts from the pre-trained adapter, not its random initial weights

    progress = tqdm(range(start, optim.steps), desc="teacher", initial=start, total=optim.steps)
    for step in progress:
        trained.train()
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
        samples = domain.batch(step * optim.batch_size, optim.batch_size)
        images, targets = collate(samples)
        x0 = images_to_unit_range(images).to(device).contiguous(memory_format=torch.channels_last)
        drop = torch.rand(len(samples), generator=generator) < optim.prompt_dropout
        captions = ["" if d else s.caption for s, d in zip(samples, drop.tolist(), strict=True)]
        encoded = encoder.encode(captions)
        for group in optimizer.param_groups:
            group["lr"] = optim.lr * warmup_cosine(step, optim.warmup_steps, optim.steps, optim.min_lr_ratio)
        cond = encoded if adapter is None else adapter(encoded)
        loss = diffusion_loss(unet, scheduler, x0, cond, generator, optim.min_snr_gamma)
        total, record = loss, {}
        if layout is not None and settings.layout_weight > 0:
            # On the prompts not dropped: an empty prompt describes nothing.
            logits = layout(cond)
            layout_term, accuracy = layout_loss(logits, targets, ~drop.to(device))
            total = loss + settings.layout_weight * layout_term
            record = {
                "layout": round(layout_term.item(), 4),
                "layout_accuracy": rounded_accuracy(accuracy),
            }
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        # Clipped apart, so the text side's early, larger gradients never shrink the U-Net's step.
        grad_norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), optim.grad_clip)
        if adapter is not None:
            torch.nn.utils.clip_grad_norm_(text_side.parameters(), optim.grad_clip)
        optimizer.step()
        ema.update(trained, step)
        check_finite(total, step, run)
        if run.should_log(step, optim.steps):
            lr = optimizer.param_groups[0]["lr"]
            entry = {"step": step, "loss": round(loss.item(), 5), "grad_norm": round(float(grad_norm), 4), "lr": lr}
            run.log(entry | record)
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        run.maybe_save(step + 1)
    run.save(optim.steps)
    ema.copy_to(trained)
    spec = TeacherSpec(
        resolution=config.unet.sample_size,
        text_encoder=config.text_encoder.model_dump(),
        scheduler_config=dict(scheduler.config),
        sampling=config.sampling,
        training={
            "steps": optim.steps,
            "batch_size": optim.batch_size,
            "seconds": round(run.state["elapsed_seconds"], 1),
            "torch_threads": torch.get_num_threads(),
            "device": config.device,
        },
        text_adapter=adapter.config.model_dump() if adapter is not None else None,
    )
    storage = getattr(torch, config.export_dtype)
    unet = unet.to(memory_format=torch.contiguous_format).cpu()
    adapter = adapter.cpu().eval() if adapter is not None else None
    save_teacher(unet, spec, config.export, storage_dtype=storage, text_adapter=adapter)
    print(f"teacher written to {config.export} ({run.state['elapsed_seconds'] / 60:.1f} min of training)")
    return Path(config.export)
