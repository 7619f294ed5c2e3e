"""`aptp export`: write a bundle (router + one sliced expert per code + manifest) from a teacher and a router."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from aptp.conditioning.adapter import TEXT_ADAPTER, TextAdapter
from aptp.formats.bundle import LATENT_COMPONENTS, CodeEntry, LatentComponents, Manifest, write_manifest
from aptp.formats.diffusers import is_pipeline_folder, load_stable_diffusion, pipeline_teacher_spec
from aptp.formats.expert import save_expert
from aptp.formats.teacher import TeacherSpec, load_teacher, load_text_adapter
from pruning.slicing import slice_unet
from pruning.space import ArchitectureSpace
from router.model import Router, RouterConfig


def export_bundle(
    out: str | Path,
    teacher: nn.Module,
    spec: TeacherSpec,
    router: Router,
    experts: Sequence[nn.Module] | None = None,
    training_shares: Sequence[float] | None = None,
    info: dict | None = None,
    storage_dtype: torch.dtype = torch.float32,
    text_adapter: TextAdapter | None = None,
    pipeline: str | Path | None = None,
) -> Path:
    """Write the bundle folder `out` (replaced if it exists). `experts[k]` is code k's sliced (fine-tuned) U-Net;
    when not given, each code's expert is sliced from the teacher as is. Expert weights are stored as
    `storage_dtype`; the teacher's `text_adapter` (required when it has one) too when that is exact (it is when the
    teacher folder stored it so), else in float32, so every code reads exactly the states it was fine-tuned on.
    With `pipeline` (the diffusers folder the teacher U-Net comes from), the bundle carries that pipeline's VAE,
    text encoder and tokenizer, copied as they are."""
    if (text_adapter is None) != (spec.text_adapter is None):
        raise ValueError("export_bundle: pass the teacher's text adapter exactly when the teacher has one")
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    space = router.space
    architectures = router.code_architectures()
    shares = list(training_shares) if training_shares is not None else [1.0 / len(architectures)] * len(architectures)
    entries = []
    for code, arch in enumerate(architectures):
        expert = experts[code] if experts is not None else slice_unet(teacher, space, arch)
        folder = f"experts/{code}"
        save_expert(expert, space, arch, tmp / folder, storage_dtype=storage_dtype)
        entries.append(
            CodeEntry(
                code=code,
                expert=folder,
                architecture="".join(str(int(v)) for v in arch.tolist()),
                macs=space.macs(arch, spec.resolution),
                params=sum(p.numel() for p in expert.parameters()),
                training_share=float(shares[code]),
            )
        )
    router.save(tmp / "router")
    if text_adapter is not None:
        exact = all(torch.equal(t, t.to(storage_dtype).to(t.dtype)) for t in text_adapter.state_dict().values())
        text_adapter.save(tmp / TEXT_ADAPTER, storage_dtype if exact else torch.float32)
    latent = None
    if pipeline is not None:
        for name in LATENT_COMPONENTS:
            shutil.copytree(Path(pipeline) / name, tmp / name)
        vae = json.loads((Path(pipeline) / "vae" / "config.json").read_text())
        latent = LatentComponents(source=str(pipeline), vae_scale_factor=2 ** (len(vae["block_out_channels"]) - 1))
    manifest = Manifest(
        teacher_config={k: v for k, v in teacher.config.items() if not k.startswith("_")},
        scheduler_config=spec.scheduler_config,
        resolution=spec.resolution,
        text_encoder=spec.text_encoder,
        teacher_macs=space.total_macs(spec.resolution),
        codes=entries,
        sampling=spec.sampling,
        info=info or {},
        text_adapter=text_adapter.config.model_dump() if text_adapter is not None else None,
        latent=latent,
    )
    write_manifest(tmp, manifest)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def random_bundle(
    teacher_folder: str | Path, out: str | Path, num_codes: int = 4, keeps: Sequence[float] | None = None, seed: int = 0
) -> Path:
    """A bundle whose codes are random architectures of the teacher (no training): for development and tests of
    the serving path before a trained router exists. Code k keeps a fraction `keeps[k]` of each unit's gates;
    the router is untrained: deterministic, but its all-on prompt gates make every prompt pick the densest code."""
    pipeline = teacher_folder if is_pipeline_folder(teacher_folder) else None
    if pipeline is not None:  # a diffusers folder: codes of its U-Net, and the bundle carries its VAE and CLIP
        parts = load_stable_diffusion(pipeline)
        teacher, adapter = parts.unet, None
        spec, text_len = pipeline_teacher_spec(parts)
    else:
        teacher, spec = load_teacher(teacher_folder)
        adapter, text_len = load_text_adapter(teacher_folder), spec.context_length
    space = ArchitectureSpace.from_unet(teacher, text_len=text_len)
    keeps = list(keeps) if keeps is not None else [1.0 - 0.6 * k / max(1, num_codes - 1) for k in range(num_codes)]
    torch.manual_seed(seed)
    router = Router(RouterConfig(num_codes=num_codes, encoder=spec.text_encoder), space, spec.resolution)
    architectures = torch.stack([space.random(keep, seed=seed + code) for code, keep in enumerate(keeps)])
    order = router.codes.depth_order
    for arch, keep in zip(architectures, keeps, strict=True):
        kept = max(1, round(keep * len(order)))
        depth = torch.zeros(len(order))
        depth[order[:kept]] = 1.0
        arch[space.width_dim :] = depth
    router.codes.set_architectures(architectures, router.config.offset)
    info = {"kind": "random-codes", "keeps": keeps, "seed": seed}
    return export_bundle(out, teacher, spec, router, info=info, text_adapter=adapter, pipeline=pipeline)
