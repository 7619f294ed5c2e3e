"""What `aptp inspect` reports about a U-Net folder, an expert folder or a diffusers pipeline folder: its
architecture space per block, parameter count, and MACs (total, prunable, and the expert's own); for a pipeline,
also the VAE decoder's MACs per image and the text encoder's per prompt, so that what an image costs is complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aptp.formats.diffusers import check_pipeline_folder, is_pipeline_folder
from aptp.formats.expert import is_expert_folder, read_expert_info
from aptp.formats.teacher import TEACHER_DESCRIPTION, read_teacher_description
from pruning.macs import flop_counter_macs, meta_flop_macs
from pruning.space import DEFAULT_TEXT_LEN, ArchitectureSpace


def _unet_config_path(path: Path) -> Path:
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no config.json, unet/config.json or expert.json found")


def _load_skeleton(config_path: Path):
    from diffusers import UNet2DConditionModel

    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    class_name = config.get("_class_name", "UNet2DConditionModel") if isinstance(config, dict) else None
    if class_name != "UNet2DConditionModel":
        raise ValueError(f"{config_path}: expected a UNet2DConditionModel config, found {class_name!r}")
    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{config_path}: cannot build a UNet2DConditionModel from it ({e})") from None


def _pipeline_parts(path: Path) -> dict[str, Any]:
    """A diffusers pipeline folder's VAE and text encoder, built on `meta` from their configs (checked first)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = check_pipeline_folder(path)
    tokenizer = path / "tokenizer" / "tokenizer_config.json"
    text_len = int(json.loads(tokenizer.read_text()).get("model_max_length", 77)) if tokenizer.is_file() else 77
    text_len = min(text_len, int(configs["text_encoder"].get("max_position_embeddings", text_len)))
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    return {"vae": vae, "text_encoder": text_encoder, "text_len": text_len}


def describe(
    path: str | Path,
    resolution: int | None = None,
    text_len: int | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Report on a diffusers U-Net folder (config.json; weights optional) or an expert folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    pipeline = None
    if is_expert_folder(path):
        info, skeleton = read_expert_info(path)
        space, arch, kind = info.space, info.arch, "expert"
        if text_len is not None and text_len != space.text_len:
            space = ArchitectureSpace.from_dict({**space.to_dict(), "text_len": text_len})
    else:
        pipeline = _pipeline_parts(path) if is_pipeline_folder(path) else None
        teacher = read_teacher_description(path) if (path / TEACHER_DESCRIPTION).is_file() else None
        skeleton = _load_skeleton(_unet_config_path(path))
        default_len = pipeline["text_len"] if pipeline else teacher.context_length if teacher else DEFAULT_TEXT_LEN
        space = ArchitectureSpace.from_unet(skeleton, text_len=text_len or default_len)
        arch, kind = space.full(), "pipeline" if pipeline else "teacher" if teacher else "unet"
    if resolution is not None and resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    resolution = resolution or space.default_resolution
    table = space.mac_table(resolution)
    hard = space.harden(arch)
    units = []
    for unit in space.units:
        gates = hard[space.slices[unit.name]]
        units.append(
            {
                "name": unit.name,
                "kind": unit.kind.value,
                "block": unit.block,
                "gates": unit.num_gates,
                "channels_per_gate": unit.channels_per_gate,
                "kept": int(gates.sum()),
                "macs": table.unit_macs[unit.name],
            }
        )
    report: dict[str, Any] = {
        "path": str(path),
        "kind": kind,
        "resolution": list(table.resolution),
        "text_len": space.text_len,
        "params": sum(p.numel() for p in skeleton.parameters()),
        "total_macs": table.total,
        "prunable_macs": table.total - table.fixed,
        "fixed_macs": table.fixed,
        "op_macs": table.op_macs,
        "architecture_dim": space.dim,
        "units": units,
    }
    if pipeline:
        vae, text_encoder = pipeline["vae"], pipeline["text_encoder"]
        latents = torch.zeros(1, vae.config.latent_channels, *table.resolution, device="meta")
        ids = torch.zeros(1, space.text_len, dtype=torch.long, device="meta")
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        report["pixel_resolution"] = [side * scale for side in table.resolution]
        report["vae_decoder_macs_per_image"] = meta_flop_macs(vae, lambda twin: twin.decode(latents))
        report["text_encoder_macs_per_prompt"] = meta_flop_macs(text_encoder, lambda twin: twin(ids))
    if kind == "expert":
        report["expert_macs"] = space.macs(arch, resolution)
        report["mac_ratio"] = report["expert_macs"] / table.total
    if verify:
        counted = flop_counter_macs(skeleton, resolution, space.text_len)
        modelled = report.get("expert_macs", table.total)
        report["flop_counter_macs"] = counted
        report["flop_counter_rel_error"] = abs(modelled - counted) / counted
    return report


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G" if macs >= 1e8 else f"{macs / 1e6:.2f} M"


def format_report(report: dict[str, Any]) -> str:
    """Human-readable form of [`describe`]'s report: a table per block, then totals."""
    lines = [
        f"{report['path']} ({report['kind']}), resolution {report['resolution'][0]}x{report['resolution'][1]}, "
        f"text length {report['text_len']}",
        "",
        f"{'block':<14}{'unit kind':<19}{'units':>6}{'gates':>8}{'kept':>8}{'MACs (full)':>16}",
    ]
    blocks: dict[tuple[str, str], list[dict]] = {}
    for unit in report["units"]:
        blocks.setdefault((unit["block"], unit["kind"]), []).append(unit)
    for (block, kind), units in blocks.items():
        gates = sum(u["gates"] for u in units)
        kept = sum(u["kept"] for u in units)
        macs = sum(u["macs"] for u in units)
        lines.append(f"{block:<14}{kind:<19}{len(units):>6}{gates:>8}{kept:>8}{_g(macs):>16}")
    ops = report["op_macs"]
    lines += [
        "",
        f"parameters        {report['params']:,}",
        f"architecture dim  {report['architecture_dim']}",
        f"total MACs        {_g(report['total_macs'])}  (conv {_g(ops['conv'])}, linear {_g(ops['linear'])}, "
        f"attention matmuls {_g(ops['attention_matmul'])})",
        f"prunable MACs     {_g(report['prunable_macs'])}  "
        f"({report['prunable_macs'] / report['total_macs']:.1%} of total)",
    ]
    if "vae_decoder_macs_per_image" in report:
        height, width = report["pixel_resolution"]
        lines += [
            f"VAE decoder MACs  {_g(report['vae_decoder_macs_per_image'])}  per image ({height}x{width} pixels)",
            f"text encoder MACs {_g(report['text_encoder_macs_per_prompt'])}  per prompt "
            f"({report['text_len']} tokens; once per request for the prompt, once for a negative prompt)",
        ]
    if "expert_macs" in report:
        lines.append(f"expert MACs       {_g(report['expert_macs'])}  ({report['mac_ratio']:.1%} of the full model)")
    if "flop_counter_macs" in report:
        lines.append(
            f"FlopCounterMode   {_g(report['flop_counter_macs'])}  (relative difference "
            f"{report['flop_counter_rel_error']:.2e})"
        )
    lines.append("MACs are for one U-Net call at batch 1.")
    return "\n".join(lines)
