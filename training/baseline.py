"""`aptp train baseline`: the static "Norm" baseline. One architecture for every prompt, found by L1-norm
structured pruning of the teacher to a MAC budget, fine-tuned on all prompts with the same losses and the same
total number of steps as the APTP experts, and exported as a one-code bundle so that it is served and evaluated
exactly like APTP."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field

from aptp.formats.expert import is_expert_folder, load_expert, save_expert
from pruning.importance import check_l1_budget, l1_architecture_for_budget
from pruning.slicing import slice_unet
from pruning.space import ArchitectureSpace
from router.model import Router, RouterConfig

from .config import ConfigError
from .data.captions import CaptionFolderConfig, training_data
from .distributed import Processes
from .export import export_bundle
from .finetune import ExpertTraining, finetune_expert
from .models import load_training_teacher
from .run import DistillingSettings


class BaselineConfig(DistillingSettings):
    """Config of `aptp train baseline` (see configs/shapes/baseline.yaml)."""

    teacher: str = "bundles/shapes/teacher"
    out: str = "runs/baseline-shapes"
    export: str = "runs/baseline-shapes/bundle"
    seed: int = 3
    budget: float = Field(0.6, gt=0, le=1, description="MACs as a fraction of the teacher's")
    data: CaptionFolderConfig | None = Field(
        None, description="an image-caption folder to train on; default: the embedded shapes domain"
    )
    training_prompts: int = Field(20_000, ge=1, description="size of the training pool (at most one epoch of a folder)")
    expert: ExpertTraining = ExpertTraining(steps=2400)
    export_dtype: str = Field("float16", pattern="^(float16|bfloat16|float32)$")

    def check_budget(self, space: ArchitectureSpace, resolution: int) -> float:
        """Refuse a budget under the cheapest network L1 pruning leaves in `space` (a config error naming `budget`);
        return that network's cost."""
        try:
            return check_l1_budget(space, self.budget, resolution)
        except ValueError as e:
            raise ConfigError(f"budget: {e}") from None


def run_baseline(config: BaselineConfig) -> Path:
    if config.threads:
        torch.set_num_threads(config.threads)
    processes = Processes(config.device, config.mixed_precision)
    device = processes.device
    teacher = load_training_teacher(config.teacher, device, dtype=config.torch_teacher_dtype)
    spec = teacher.spec
    space = ArchitectureSpace.from_unet(teacher.unet, text_len=teacher.text_len)
    config.check_budget(space, spec.resolution)
    arch = l1_architecture_for_budget(teacher.unet, space, config.budget, spec.resolution)
    data = training_data(config.data, teacher.pixel_resolution, config.seed, config.phrasing)
    teacher.use_latent_cache(data, processes)
    storage = getattr(torch, config.export_dtype)
    done = Path(config.out) / "expert"
    if is_expert_folder(done):
        student = load_expert(done, device=device)[0]
    else:
        pool = range(min(config.training_prompts, len(data)))
        student = finetune_expert(
            slice_unet(teacher.unet, space, arch).float(), teacher, pool, data, config.expert, config, name="static"
        )
        if processes.is_main:
            save_expert(student, space, arch, done, storage_dtype=storage)
    routing = teacher.router_encoder
    router_config = RouterConfig(num_codes=1, embed_dim=routing.embed_dim, encoder=routing.config)
    router = Router(router_config, space, spec.resolution)
    router.codes.set_architectures(arch[None])
    info = {"stage": "static-l1-baseline", "budget": config.budget, "steps": config.expert.steps}
    experts, shares = [student], [1.0]
    if processes.is_main:
        export_bundle(
            config.export, teacher.unet, spec, router, experts, shares, info, storage, **teacher.export_kwargs()
        )
    processes.wait()
    print(f"baseline bundle written to {config.export}: {space.macs(arch, spec.resolution) / 1e6:.1f} MMACs per call")
    return Path(config.export)
