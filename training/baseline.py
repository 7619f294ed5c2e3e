"""`aptp train baseline`: the static "Norm" baseline. One architecture for every prompt, found by L1-norm
structured pruning of the teacher to a MAC budget, fine-tuned on all prompts with the same losses and the same
total number of steps as the APTP experts, and exported as a one-code bundle so that it is served and evaluated
exactly like APTP."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field
from torch import nn

from aptp.formats.expert import is_expert_folder, load_expert, save_expert
from aptp.formats.teacher import load_teacher, load_teacher_conditioner
from pruning.slicing import group_channels, slice_unet
from pruning.space import ArchitectureSpace, UnitKind, feed_forward_layers
from router.model import Router, RouterConfig

from .data.shapes import ShapesDomain
from .export import export_bundle
from .finetune import ExpertTraining, finetune_expert
from .run import RunSettings


class BaselineConfig(RunSettings):
    """Config of `aptp train baseline` (see configs/shapes/baseline.yaml)."""

    teacher: str = "bundles/shapes/teacher"
    out: str = "runs/baseline-shapes"
    export: str = "runs/baseline-shapes/bundle"
    seed: int = 3
    budget: float = Field(0.6, gt=0, le=1, description="MACs as a fraction of the teacher's")
    training_prompts: int = Field(20_000, ge=1)
    expert: ExpertTraining = ExpertTraining(steps=2400)
    export_dtype: str = Field("float16", pattern="^(float16|bfloat16|float32)$")


@torch.no_grad()
def l1_importance(unet: nn.Module, space: ArchitectureSpace) -> torch.Tensor:
    """Mean |weight| of everything each width gate keeps or drops, `(width_dim,)`."""
    scores = []
    for unit in space.width_units:
        module = unet.get_submodule(unit.module)
        per_gate = []
        for gate in range(unit.num_gates):
            idx = group_channels([gate], unit.channels_per_gate)
            if unit.kind is UnitKind.RESNET:
                weights = [module.conv1.weight[idx], module.conv2.weight[:, idx]]
            elif unit.kind is UnitKind.FEED_FORWARD:
                proj_path, out_path = feed_forward_layers(module)
                proj, out = module.get_submodule(proj_path), module.get_submodule(out_path)
                rows = torch.cat([idx, idx + out.in_features]) if proj.out_features == 2 * out.in_features else idx
                weights = [proj.weight[rows], out.weight[:, idx]]
            else:
                weights = [module.to_q.weight[idx], module.to_k.weight[idx], module.to_v.weight[idx]]
                weights.append(module.to_out[0].weight[:, idx])
            per_gate.append(torch.cat([w.abs().flatten() for w in weights]).mean())
        scores.append(torch.stack(per_gate))
    return torch.cat(scores)


def l1_architecture(space: ArchitectureSpace, importance: torch.Tensor, keep: float) -> torch.Tensor:
    """Keep the `keep` fraction (rounded, at least one) of each width unit's gates with the largest L1 norm; depth
    is not pruned."""
    arch = torch.ones(space.dim)
    for unit in space.width_units:
        sl = space.slices[unit.name]
        count = max(1, round(keep * unit.num_gates))
        kept = importance[sl].topk(count).indices
        gates = torch.zeros(unit.num_gates)
        gates[kept] = 1.0
        arch[sl] = gates
    return arch


def l1_architecture_for_budget(
    unet: nn.Module, space: ArchitectureSpace, budget: float, resolution: int, iterations: int = 30
) -> torch.Tensor:
    """The uniform keep ratio whose L1 architecture costs at most `budget` x the teacher's MACs (bisection)."""
    importance = l1_importance(unet, space)
    target = budget * space.total_macs(resolution)
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if space.macs(l1_architecture(space, importance, mid), resolution) <= target:
            low = mid
        else:
            high = mid
    return l1_architecture(space, importance, low)


def run_baseline(config: BaselineConfig) -> Path:
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    teacher, spec = load_teacher(config.teacher, device=device)
    teacher.requires_grad_(False)
    space = ArchitectureSpace.from_unet(teacher, text_len=spec.context_length)
    arch = l1_architecture_for_budget(teacher, space, config.budget, spec.resolution)
    encoder = load_teacher_conditioner(config.teacher, spec, device)
    domain = ShapesDomain(seed=config.seed, split="train")
    storage = getattr(torch, config.export_dtype)
    done = Path(config.out) / "expert"
    if is_expert_folder(done):
        student = load_expert(done, device=device)[0]
    else:
        student = finetune_expert(
            slice_unet(teacher, space, arch),
            teacher,
            spec,
            encoder,
            range(config.training_prompts),
            domain,
            config.expert,
            config,
            name="static",
        )
        save_expert(student, space, arch, done, storage_dtype=storage)
    router_config = RouterConfig(num_codes=1, embed_dim=encoder.embed_dim, encoder=encoder.config)
    router = Router(router_config, space, spec.resolution)
    router.codes.set_architectures(arch[None])
    info = {"stage": "static-l1-baseline", "budget": config.budget, "steps": config.expert.steps}
    experts, shares = [student], [1.0]
    export_bundle(config.export, teacher, spec, router, experts, shares, info, storage, text_adapter=encoder.adapter)
    print(f"baseline bundle written to {config.export}: {space.macs(arch, spec.resolution) / 1e6:.1f} MMACs per call")
    return Path(config.export)
