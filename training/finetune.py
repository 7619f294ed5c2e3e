"""`aptp train finetune`: phase 2 of APTP. Route a fixed pool of training prompts with the trained router, slice
each code's expert from the teacher, fine-tune it on its own prompts with distillation from the frozen teacher,
and export the bundle. Each code is its own resumable run; finished experts are kept and skipped on a rerun.

Optionally (`shared_steps`, a departure from docs/method.md explained in docs/experiments.md) a shared stage comes
first: one copy of the teacher is fine-tuned on the whole routed pool, each sample gated by the hard architecture of
its prompt's code, so every step trains every code's sub-network; the experts are then sliced from that copy instead
of the teacher, and specialised by their own `expert.steps`.

The same per-expert fine-tuning serves the static baseline (`training/baseline.py`): one architecture, all prompts.
"""

from __future__ import annotations

import copy
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from aptp.formats.expert import is_expert_folder, load_expert, save_expert
from aptp.formats.kinds import DEFAULT_BUNDLE
from pruning.gates import UNetGates
from pruning.slicing import slice_unet
from pruning.space import ArchitectureSpace
from router.model import Router

from .data.captions import CaptionFolderConfig, TrainingData, training_data
from .distill import DistillLosses, student_losses
from .distributed import Processes
from .export import export_bundle
from .models import TrainingTeacher, load_training_teacher
from .noise import NoisyBatch
from .run import DistillingSettings, RunSettings, TrainingRun, check_finite, warmup_cosine


class ExpertTraining(BaseModel):
    """How one expert is fine-tuned (docs/method.md phase 2: denoising + output + feature distillation)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(600, ge=0, description="0: no fine-tuning (the slice is kept as it is)")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(50, ge=0)
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: hold `lr`, or follow a cosine from `lr` towards 0 at the end"
    )
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    prompt_dropout: float = Field(0.1, ge=0, lt=1, description="keeps the unconditional branch for guidance")
    min_snr_gamma: float = Field(5.0, gt=0)
    denoise_weight: float = 1.0
    output_weight: float = 0.2
    features_weight: float = 0.2


class FinetuneConfig(DistillingSettings):
    """Config of `aptp train finetune` (see configs/shapes/finetune.yaml)."""

    teacher: str = "bundles/shapes/teacher"
    router: str = "runs/search-shapes/router"
    out: str = "runs/finetune-shapes"
    export: str = str(DEFAULT_BUNDLE)
    seed: int = 2
    data: CaptionFolderConfig | None = Field(
        None, description="an image-caption folder to train on; default: the embedded shapes domain"
    )
    routing_prompts: int = Field(
        20_000, ge=1, description="size of the routed training-prompt pool (at most one epoch of a folder)"
    )
    expert: ExpertTraining = ExpertTraining()
    shared_steps: int = Field(
        0,
        ge=0,
        description="steps of the shared stage before the per-code fine-tuning (same settings as `expert`); 0: "
        "none, every expert starts from the teacher (docs/method.md)",
    )
    export_dtype: str = Field("float16", pattern="^(float16|bfloat16|float32)$")

    def total_steps(self, num_codes: int) -> int:
        """Optimizer steps of the whole phase (what the static baseline is given to compare at equal steps)."""
        return self.shared_steps + num_codes * self.expert.steps


@dataclass
class CodeGating:
    """Gates a full U-Net per sample by the hard architecture of the code each training prompt was routed to."""

    gates: UNetGates  # attached to the student
    architectures: torch.Tensor  # (K, dim) hard
    codes: torch.Tensor  # (N,) code of each domain index of the pool

    def select(self, picks: list[int]) -> None:
        self.gates.set(self.architectures[self.codes[picks]])


def expert_lr(training: ExpertTraining, step: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up to `lr`, then constant or a cosine to 0. Without an
    EMA, a short run's last weights carry the noise of its last updates; the cosine removes it."""
    if training.lr_schedule == "constant":
        return training.lr * min(1.0, (step + 1) / max(1, training.warmup_steps))
    return training.lr * warmup_cosine(step, training.warmup_steps, training.steps)


def finetune_expert(
    student: nn.Module,
    teacher: TrainingTeacher,
    pool: Sequence[int],
    data: TrainingData,
    training: ExpertTraining,
    run_settings: RunSettings,
    name: str,
    gating: CodeGating | None = None,
) -> nn.Module:
    """Fine-tune `student` (a sliced copy of the teacher's U-Net) on the samples at positions `pool` of `data`,
    distilling from the frozen teacher; with `gating`, `student` is a full copy run as each sample's code.
    Resumable: the run's checkpoint is `<out>/checkpoint-<name>`, its log `<out>/log-<name>.jsonl`."""
    processes = Processes(run_settings.device, run_settings.mixed_precision)
    share = processes.share(training.batch_size)  # this process's rows of each step's global batch
    scheduler = DDPMScheduler.from_config(teacher.spec.scheduler_config)
    student.requires_grad_(True)
    student.train()
    if run_settings.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(student.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    files = (f"checkpoint-{name}", f"log-{name}.jsonl")
    run = TrainingRun(
        run_settings, {"student": student}, optimizer, *files, main=processes.is_main, scaler=processes.scaler
    )
    start = run.resume()
    pool_t = torch.as_tensor(list(pool), dtype=torch.long)
    progress = tqdm(
        range(start, training.steps),
        desc=f"expert {name}",
        initial=start,
        total=training.steps,
        disable=not processes.is_main,
    )
    for step in progress:
        generator = torch.Generator().manual_seed(
            run_settings.seed * 1_000_003 + step * 7919 + zlib.crc32(name.encode())
        )
        total = training.batch_size
        picks = pool_t[torch.randint(len(pool_t), (total,), generator=generator)].tolist()[share]
        x0, captions = teacher.samples(data, picks, generator, share, total)
        drop = (torch.rand(total, generator=generator) < training.prompt_dropout)[share]
        encoded = teacher.conditioner.encode(["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)])
        batch = NoisyBatch.make(scheduler, x0, generator, training.min_snr_gamma, share, total)
        for group in optimizer.param_groups:
            group["lr"] = expert_lr(training, step)
        weights = (training.denoise_weight, training.output_weight, training.features_weight)
        optimizer.zero_grad(set_to_none=True)
        parts = Processes.parts(len(picks), run_settings.gradient_accumulation_steps)
        part_losses = []
        for part in parts:  # one U-Net pass per part, gradients accumulating
            if gating is not None:
                gating.select(picks[part])
            with processes.autocast():
                part_losses.append(student_losses(student, teacher.unet, batch.select(part), encoded.select(part)))
            processes.scale(part_losses[-1].weighted(*weights) / len(parts)).backward()
        losses = DistillLosses.mean(part_losses)
        loss = losses.weighted(*weights)
        processes.step(optimizer, list(student.parameters()), clip=training.grad_clip)
        check_finite(loss, step, run)
        if run.should_log(step, training.steps):
            run.log(
                {
                    "step": step,
                    "loss": round(loss.item(), 5),
                    "denoise": round(losses.denoise.item(), 5),
                    "output": round(losses.output.item(), 5),
                    "features": round(losses.features.item(), 5),
                }
            )
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        run.maybe_save(step + 1)
    run.save(training.steps)
    return student.eval()


def route_pool(router: Router, data: TrainingData, count: int, batch: int = 256) -> list[int]:
    """The router's code for each of the first `count` positions of `data`."""
    codes: list[int] = []
    for start in tqdm(range(0, count, batch), desc="routing"):
        captions = data.captions(range(start, min(count, start + batch)))
        codes += router.route(captions).codes.tolist()
    return codes


def train_shared(
    teacher: TrainingTeacher,
    space: ArchitectureSpace,
    architectures: torch.Tensor,
    codes: Sequence[int],
    data: TrainingData,
    config: FinetuneConfig,
) -> nn.Module:
    """The shared stage: a copy of `teacher` fine-tuned on the whole routed pool, each sample gated by its code's
    hard architecture (exactly the sliced expert's computation, see `pruning.gates`), for `config.shared_steps`.
    Kept in `<out>/shared` (float32) and reused on a rerun; resumable like an expert."""
    device = next(teacher.unet.parameters()).device
    folder = Path(config.out) / "shared"
    if is_expert_folder(folder):
        return load_expert(folder, device=device)[0]
    student = copy.deepcopy(teacher.unet).float()
    gates = UNetGates(student, space).attach()
    gating = CodeGating(gates, architectures.to(device), torch.as_tensor(list(codes), dtype=torch.long))
    training = config.expert.model_copy(update={"steps": config.shared_steps})
    try:
        finetune_expert(student, teacher, range(len(codes)), data, training, config, "shared", gating)
    finally:
        gates.detach()
    processes = Processes(config.device)
    if processes.is_main:
        save_expert(student, space, space.full(), folder, storage_dtype=torch.float32)
    processes.wait()
    return student


def run_finetune(config: FinetuneConfig) -> Path:
    """Phase 2 end to end: route, fine-tune every code's expert (resumable per code), export the bundle."""
    if config.threads:
        torch.set_num_threads(config.threads)
    processes = Processes(config.device, config.mixed_precision)
    device = processes.device
    folder = Path(config.out)
    folder.mkdir(parents=True, exist_ok=True)
    router = Router.load(config.router, device=device)
    teacher = load_training_teacher(
        config.teacher, device, router_encoder=router.config.encoder, dtype=config.torch_teacher_dtype
    )
    if router.config.encoder == teacher.router_encoder.config:
        router._encoder = teacher.router_encoder  # one sentence encoder in memory when they are the same
    space: ArchitectureSpace = router.space
    data = training_data(config.data, teacher.pixel_resolution, config.seed, config.phrasing)
    teacher.use_latent_cache(data, processes)

    routing_file = folder / "routing.json"
    if routing_file.is_file():
        codes = json.loads(routing_file.read_text())["codes"]
    else:
        codes = route_pool(router, data, min(config.routing_prompts, len(data)))
        if processes.is_main:  # every process routes the same pool the same way; one writes it
            routing_file.write_text(json.dumps({"seed": config.seed, "codes": codes}) + "\n")
    pools = [[i for i, c in enumerate(codes) if c == k] for k in range(router.config.num_codes)]
    shares = [len(p) / len(codes) for p in pools]
    print("training share per code:", [round(s, 3) for s in shares])

    architectures = router.code_architectures()
    source = teacher.unet
    if config.shared_steps:
        source = train_shared(teacher, space, architectures, codes, data, config)
    experts = []
    storage = getattr(torch, config.export_dtype)
    for code, (arch, pool) in enumerate(zip(architectures, pools, strict=True)):
        done = folder / "experts" / str(code)
        if is_expert_folder(done):
            experts.append(load_expert(done, device=device)[0])
            continue
        student = slice_unet(source, space, arch).float()
        if pool and config.expert.steps:
            student = finetune_expert(student, teacher, pool, data, config.expert, config, name=str(code))
        if processes.is_main:
            save_expert(student, space, arch, done, storage_dtype=storage)
        experts.append(student)
    info = {
        "stage": "aptp",
        "routing_prompts": config.routing_prompts,
        "steps_per_code": config.expert.steps,
        "shared_steps": config.shared_steps,
        "total_steps": config.total_steps(router.config.num_codes),
        "teacher": config.teacher,
        "router": config.router,
    }
    if processes.is_main:
        export_bundle(
            config.export, teacher.unet, teacher.spec, router, experts, shares, info, storage, **teacher.export_kwargs()
        )
        print(f"bundle written to {config.export}")
    processes.wait()
    return Path(config.export)
