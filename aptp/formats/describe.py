"""What `aptp inspect` reports about a U-Net folder, an expert folder, a diffusers pipeline folder or a bundle: its
architecture space per block, parameter count, and MACs (total, prunable, and the expert's own); for a pipeline,
also the VAE decoder's MACs per image and the text encoder's per prompt, so that what an image costs is complete.
A bundle is reported as its manifest's settings, its router, and the report of each code's expert folder. Only the
descriptions are read: no weights are loaded or checksummed (loading the bundle does that)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from aptp.formats.bundle import MANIFEST, BundleError, check_code_architecture, check_code_costs, read_manifest
from aptp.formats.diffusers import check_pipeline_folder, is_pipeline_folder
from aptp.formats.expert import EXPERT_NAME, is_expert_folder, read_expert_info
from aptp.formats.files import read_json_object
from aptp.formats.teacher import TEACHER_DESCRIPTION, read_teacher_description
from pruning.macs import flop_counter_macs, meta_flop_macs
from pruning.space import DEFAULT_TEXT_LEN, ArchitectureSpace


def _unet_config_path(path: Path) -> Path:
    for candidate in (path, path / "config.json", path / "unet" / "config.json"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no {MANIFEST}, config.json, unet/config.json or expert.json found")


def _load_skeleton(config_path: Path):
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path}: not valid JSON ({e})") from None
    return _build_skeleton(config, config_path)


def _build_skeleton(config: Any, source: Path):
    """The U-Net of `config` (read from `source`, which errors name) on the `meta` device."""
    from diffusers import UNet2DConditionModel

    class_name = config.get("_class_name", "UNet2DConditionModel") if isinstance(config, dict) else None
    if class_name != "UNet2DConditionModel":
        raise ValueError(f"{source}: expected a UNet2DConditionModel config, found {class_name!r}")
    if "_class_name" not in config and "block_out_channels" not in config:
        # diffusers would build its default (SD-sized) U-Net from any JSON object: a wrong answer, not a report
        raise ValueError(f"{source}: not a UNet2DConditionModel config (neither _class_name nor block_out_channels)")
    try:
        with torch.device("meta"):
            return UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"{source}: cannot build a UNet2DConditionModel from it ({e})") from None


def _decoder_and_text_encoder(vae_config: dict[str, Any], text_encoder_config: dict[str, Any]) -> dict[str, Any]:
    """A VAE and a CLIP text encoder, built on `meta` from their configs."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        return {
            "vae": AutoencoderKL.from_config(vae_config),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**text_encoder_config)),
        }


def _pipeline_parts(path: Path) -> dict[str, Any]:
    """A diffusers pipeline folder's VAE and text encoder, built on `meta` from their configs (checked first)."""
    configs = check_pipeline_folder(path)
    tokenizer = path / "tokenizer" / "tokenizer_config.json"
    text_len = int(json.loads(tokenizer.read_text()).get("model_max_length", 77)) if tokenizer.is_file() else 77
    text_len = min(text_len, int(configs["text_encoder"].get("max_position_embeddings", text_len)))
    return {**_decoder_and_text_encoder(configs["vae"], configs["text_encoder"]), "text_len": text_len}


def _decoder_and_text_encoder_macs(parts: dict[str, Any], resolution: list[int], text_len: int) -> dict[str, Any]:
    """What decoding one image of `resolution` latents and encoding one prompt of `text_len` tokens cost."""
    vae, text_encoder = parts["vae"], parts["text_encoder"]
    latents = torch.zeros(1, vae.config.latent_channels, *resolution, device="meta")
    ids = torch.zeros(1, text_len, dtype=torch.long, device="meta")
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return {
        "pixel_resolution": [side * scale for side in resolution],
        "vae_decoder_macs_per_image": meta_flop_macs(vae, lambda twin: twin.decode(latents)),
        "text_encoder_macs_per_prompt": meta_flop_macs(text_encoder, lambda twin: twin(ids)),
    }


def describe(
    path: str | Path,
    resolution: int | None = None,
    text_len: int | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Report on a diffusers U-Net folder (config.json; weights optional), a pipeline, teacher or expert folder, or a
    bundle folder (`manifest.json`, or the manifest itself)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.name == MANIFEST and path.is_file():
        path = path.parent
    if (path / MANIFEST).is_file():
        return _describe_bundle(path, resolution, text_len, verify)
    return describe_model(path, resolution, text_len, verify)[0]


def describe_model(
    path: str | Path,
    resolution: int | None = None,
    text_len: int | None = None,
    verify: bool = False,
    spaces: dict[str, ArchitectureSpace] | None = None,
) -> tuple[dict[str, Any], ArchitectureSpace, torch.Tensor]:
    """[`describe`]'s report on a U-Net, pipeline, teacher or expert folder, with the space and the architecture it
    was counted with. `spaces` shares the spaces (and so their traced MAC tables) between experts of one teacher."""
    path, pipeline = Path(path), None
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
    if spaces is not None:
        space = spaces.setdefault(json.dumps(space.to_dict(), sort_keys=True), space)
    if resolution is not None and resolution <= 0:
        raise ValueError(f"--resolution must be positive, got {resolution}")
    resolution = resolution or space.default_resolution
    report: dict[str, Any] = {
        "path": str(path),
        "kind": kind,
        **_space_totals(space, resolution),
        "params": sum(p.numel() for p in skeleton.parameters()),
        "units": _unit_rows(space, arch, resolution),
    }
    if pipeline:
        report.update(_decoder_and_text_encoder_macs(pipeline, report["resolution"], space.text_len))
    if kind == "expert":
        report["expert_macs"] = space.macs(arch, resolution)
        report["mac_ratio"] = report["expert_macs"] / report["total_macs"]
    if verify:
        counted = flop_counter_macs(skeleton, resolution, space.text_len)
        modelled = report.get("expert_macs", report["total_macs"])
        report["flop_counter_macs"] = counted
        report["flop_counter_rel_error"] = abs(modelled - counted) / counted
    return report, space, arch


def _space_totals(space: ArchitectureSpace, resolution: int) -> dict[str, Any]:
    """What a report says of the full model a space prunes, at `resolution`."""
    table = space.mac_table(resolution)
    return {
        "resolution": list(table.resolution),
        "text_len": space.text_len,
        "total_macs": table.total,
        "prunable_macs": table.total - table.fixed,
        "fixed_macs": table.fixed,
        "op_macs": table.op_macs,
        "architecture_dim": space.dim,
    }


def _unit_rows(space: ArchitectureSpace, arch: torch.Tensor, resolution: int) -> list[dict[str, Any]]:
    """Per prunable unit: its place, its gates, how many of them `arch` keeps, and its MACs at full width."""
    table = space.mac_table(resolution)
    hard = space.harden(arch)
    return [
        {
            "name": unit.name,
            "kind": unit.kind.value,
            "block": unit.block,
            "gates": unit.num_gates,
            "channels_per_gate": unit.channels_per_gate,
            "kept": int(hard[space.slices[unit.name]].sum()),
            "macs": table.unit_macs[unit.name],
        }
        for unit in space.units
    ]


def describe_codes(space: ArchitectureSpace, archs: torch.Tensor, resolution: int | None = None) -> dict[str, Any]:
    """The report on a set of code architectures `(K, dim)` of one space (a router's, before any expert exists):
    the full model's totals, and per code its MACs, their share of the full model's and the gates it keeps."""
    resolution = resolution or space.default_resolution
    totals = _space_totals(space, resolution)
    codes = []
    for index, arch in enumerate(archs):
        macs = space.macs(arch, resolution)
        units = _unit_rows(space, arch, resolution)
        codes.append({"code": index, "macs": macs, "mac_ratio": macs / totals["total_macs"], "units": units})
    return {**totals, "num_codes": len(codes), "codes": codes}


def _describe_bundle(path: Path, resolution: int | None, text_len: int | None, verify: bool) -> dict[str, Any]:
    """[`describe`]'s report on a bundle: its settings, and per code the report on its expert folder, checked against
    what the manifest says of the code (at the bundle's own resolution and text length). The router sits above this
    layer: `aptp.cli.inspect.inspect_report` adds its settings."""
    manifest = read_manifest(path, verify=False)
    spaces: dict[str, ArchitectureSpace] = {}
    codes = []
    for entry in manifest.codes:
        folder = path / entry.expert
        if not is_expert_folder(folder):
            problem = f"has no {EXPERT_NAME}" if folder.is_dir() else "is missing"
            raise BundleError(folder, f"code {entry.code}'s expert folder (listed in {MANIFEST}) {problem}")
        report, _, arch = describe_model(folder, resolution or manifest.resolution, text_len, verify, spaces)
        check_code_architecture(path, entry, arch)
        if resolution in (None, manifest.resolution) and text_len is None:  # the manifest counts at its own
            check_code_costs(path, manifest, entry, report["expert_macs"], report["params"], report["total_macs"])
        codes.append({"code": entry.code, "expert": entry.expert, "training_share": entry.training_share, **report})
    first = codes[0]
    teacher = _build_skeleton(manifest.teacher_config, path / MANIFEST)
    bundle: dict[str, Any] = {
        "path": str(path),
        "kind": "bundle",
        "num_codes": manifest.num_codes,
        "resolution": first["resolution"],
        "text_len": first["text_len"],
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "teacher_macs": first["total_macs"],
        "prunable_macs": first["prunable_macs"],
        "op_macs": first["op_macs"],
        "architecture_dim": first["architecture_dim"],
        "prediction_type": manifest.prediction_type,
        "sampling": manifest.sampling.model_dump(),
        "text_encoder": manifest.text_encoder.model_dump(),
        "text_adapter": manifest.text_adapter.model_dump() if manifest.text_adapter else None,
        "info": manifest.info,
    }
    if manifest.latent is not None:
        parts = _decoder_and_text_encoder(
            read_json_object(path / "vae" / "config.json", BundleError),
            read_json_object(path / "text_encoder" / "config.json", BundleError),
        )
        bundle.update(_decoder_and_text_encoder_macs(parts, first["resolution"], first["text_len"]))
    bundle["codes"] = codes
    return bundle


def _g(macs: int) -> str:
    return f"{macs / 1e9:.3f} G" if macs >= 1e8 else f"{macs / 1e6:.2f} M"


def _codes(count: int) -> str:
    return f"{count} code{'s' * (count != 1)}"


def _block_table(reports: list[dict[str, Any]], kept_headers: list[str]) -> list[str]:
    """Per block and unit kind: units, gates, the gates each report keeps (one column each), and the full MACs."""
    heading = "".join(f"{header:>8}" for header in kept_headers)
    lines = [f"{'block':<14}{'unit kind':<19}{'units':>6}{'gates':>8}{heading}{'MACs (full)':>16}"]
    blocks: dict[tuple[str, str], list[int]] = {}
    for index, unit in enumerate(reports[0]["units"]):
        blocks.setdefault((unit["block"], unit["kind"]), []).append(index)
    for (block, kind), indices in blocks.items():
        units = [reports[0]["units"][i] for i in indices]
        gates = sum(u["gates"] for u in units)
        macs = sum(u["macs"] for u in units)
        kept = "".join(f"{sum(r['units'][i]['kept'] for i in indices):>8}" for r in reports)
        lines.append(f"{block:<14}{kind:<19}{len(units):>6}{gates:>8}{kept}{_g(macs):>16}")
    return lines


def _total_lines(report: dict[str, Any], total: int) -> list[str]:
    ops = report["op_macs"]
    return [
        f"total MACs        {_g(total)}  (conv {_g(ops['conv'])}, linear {_g(ops['linear'])}, "
        f"attention matmuls {_g(ops['attention_matmul'])})",
        f"prunable MACs     {_g(report['prunable_macs'])}  ({report['prunable_macs'] / total:.1%} of total)",
    ]


def _decoder_lines(report: dict[str, Any]) -> list[str]:
    if "vae_decoder_macs_per_image" not in report:
        return []
    height, width = report["pixel_resolution"]
    return [
        f"VAE decoder MACs  {_g(report['vae_decoder_macs_per_image'])}  per image ({height}x{width} pixels)",
        f"text encoder MACs {_g(report['text_encoder_macs_per_prompt'])}  per prompt "
        f"({report['text_len']} tokens; once per request for the prompt, once for a negative prompt)",
    ]


def format_report(report: dict[str, Any]) -> str:
    """Human-readable form of [`describe`]'s report: a table per block, then totals."""
    if report["kind"] == "bundle":
        return _format_bundle(report)
    if report["kind"] == "router":
        return _format_router(report)
    lines = [
        f"{report['path']} ({report['kind']}), resolution {report['resolution'][0]}x{report['resolution'][1]}, "
        f"text length {report['text_len']}",
        "",
        *_block_table([report], ["kept"]),
        "",
        f"parameters        {report['params']:,}",
        f"architecture dim  {report['architecture_dim']}",
        *_total_lines(report, report["total_macs"]),
        *_decoder_lines(report),
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


def _router_line(router: dict[str, Any]) -> str:
    held = f", {router['held_open_gates']} width gates held open" if router["held_open_gates"] else ""
    return (
        f"router            {_codes(router['num_codes'])} from {router['encoder']} embeddings "
        f"({router['embed_dim']}), depth pruning {'on' if router['prune_depth'] else 'off'}{held}"
    )


def _format_router(report: dict[str, Any]) -> str:
    """A router folder: its settings, a line per code (MACs and balancing offset), then the gates each code keeps."""
    lines = [
        f"{report['path']} (router, {_codes(report['num_codes'])}), resolution "
        f"{report['resolution'][0]}x{report['resolution'][1]}, text length {report['text_len']}",
        "",
        _router_line(report["router"]),
        f"architecture dim  {report['architecture_dim']}",
        *_total_lines(report, report["total_macs"]),
        "",
        f"{'code':>4}{'MACs':>13}{'of teacher':>12}{'offset':>11}",
    ]
    for code in report["codes"]:
        lines.append(f"{code['code']:>4}{_g(code['macs']):>13}{code['mac_ratio']:>12.1%}{code['offset']:>+11.4f}")
    lines += [
        "",
        "gates kept per block, by code:",
        *_block_table(report["codes"], [f"code {c['code']}" for c in report["codes"]]),
        "MACs are for one U-Net call at batch 1; the codes' experts are made by fine-tuning (aptp train finetune).",
    ]
    return "\n".join(lines)


def _format_bundle(report: dict[str, Any]) -> str:
    """A bundle: its settings, a line per code, then the gates each code keeps per block."""
    sampling, encoder, adapter = (report[k] for k in ("sampling", "text_encoder", "text_adapter"))
    conditioning = f"{encoder['name']} ({encoder['max_length']} tokens)"
    if adapter:
        prompt_map = f", {adapter['map_grid']}x{adapter['map_grid']} prompt map" if adapter["map_grid"] else ""
        conditioning += (
            f", text adapter (width {adapter['width']}, {adapter['layers']} layers, "
            f"{adapter['summary_tokens']} summary tokens{prompt_map})"
        )
    router = report.get("router")  # added above the formats layer (`aptp inspect`)
    router_lines = [_router_line(router)] if router is not None else []
    width = max(len(code["expert"]) for code in report["codes"]) + 2
    lines = [
        f"{report['path']} (bundle, {_codes(report['num_codes'])}), resolution "
        f"{report['resolution'][0]}x{report['resolution'][1]}, text length {report['text_len']}",
        "",
        f"sampling          {sampling['steps']} steps, guidance scale {sampling['guidance_scale']}, "
        f"prediction type {report['prediction_type']}",
        f"text encoder      {conditioning}",
        *router_lines,
        f"teacher           {report['teacher_params']:,} parameters, architecture dim {report['architecture_dim']}",
        *_total_lines(report, report["teacher_macs"]),
        *_decoder_lines(report),
        "",
        f"{'code':>4}  {'expert':<{width}}{'MACs':>11}{'of teacher':>12}{'parameters':>14}{'of teacher':>12}"
        f"{'training share':>16}",
    ]
    for code in report["codes"]:
        lines.append(
            f"{code['code']:>4}  {code['expert']:<{width}}{_g(code['expert_macs']):>11}{code['mac_ratio']:>12.1%}"
            f"{code['params']:>14,}{code['params'] / report['teacher_params']:>12.1%}{code['training_share']:>16.1%}"
        )
    lines += [
        "",
        "gates kept per block, by code:",
        *_block_table(report["codes"], [f"code {c['code']}" for c in report["codes"]]),
    ]
    if any("flop_counter_macs" in code for code in report["codes"]):
        lines.append("")
        lines += [
            f"FlopCounterMode   code {code['code']}: {_g(code['flop_counter_macs'])}  (relative difference "
            f"{code['flop_counter_rel_error']:.2e})"
            for code in report["codes"]
        ]
    lines.append("MACs are for one U-Net call at batch 1.")
    return "\n".join(lines)
