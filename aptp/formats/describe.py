"""What `aptp inspect` reports about a U-Net folder or an expert folder: its architecture space per block,
parameter count, and MACs (total, prunable, and the expert's own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aptp.formats.expert import is_expert_folder, read_expert_info
from pruning.macs import flop_counter_macs
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
    if is_expert_folder(path):
        info, skeleton = read_expert_info(path)
        space, arch, kind = info.space, info.arch, "expert"
        if text_len is not None and text_len != space.text_len:
            space = ArchitectureSpace.from_dict({**space.to_dict(), "text_len": text_len})
    else:
        skeleton = _load_skeleton(_unet_config_path(path))
        space = ArchitectureSpace.from_unet(skeleton, text_len=text_len or DEFAULT_TEXT_LEN)
        arch, kind = space.full(), "unet"
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
    if "expert_macs" in report:
        lines.append(f"expert MACs       {_g(report['expert_macs'])}  ({report['mac_ratio']:.1%} of the full model)")
    if "flop_counter_macs" in report:
        lines.append(
            f"FlopCounterMode   {_g(report['flop_counter_macs'])}  (relative difference "
            f"{report['flop_counter_rel_error']:.2e})"
        )
    lines.append("MACs are for one U-Net call at batch 1.")
    return "\n".join(lines)
