"""The bundle: the unit that training produces and the server loads.

```
bundle/
  manifest.json        format, teacher config, noise schedule, resolution, text encoder, K, and per code:
                       architecture, MACs per U-Net call, params, training share; sha256 of every file
  router/              config.json + model.safetensors (see router.model.Router)
  experts/<code>/      one sliced U-Net per code (see pruning.expert)
  text_adapter/        only when the teacher has one: config.json + model.safetensors (see pruning.conditioning),
                       the teacher's trained adapter, shared by every code
```
Reading a bundle checks the manifest's fields and every file's checksum before anything is built; errors name the
file. This module knows the layout; the router is loaded by `router.model.Router.load`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .conditioning import ADAPTER_WEIGHTS, TEXT_ADAPTER, TextAdapter
from .expert import load_expert
from .files import ModelFileError, file_sha256, read_json_object

BUNDLE_FORMAT = "aptp-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ModelFileError):
    """A bundle is incomplete, corrupt, or inconsistent; the message names the file."""


@dataclass
class CodeEntry:
    """One architecture code of a bundle.

    Parameters:
        code (`int`): its index (the router's output).
        expert (`str`): the expert folder, relative to the bundle.
        architecture (`str`): the hard architecture vector as a string of 0/1.
        macs (`int`): MACs of one U-Net call at batch 1 at the bundle's resolution.
        params (`int`): parameters of the sliced U-Net.
        training_share (`float`): share of training prompts routed to this code.
    """

    code: int
    expert: str
    architecture: str
    macs: int
    params: int
    training_share: float

    def architecture_tensor(self) -> torch.Tensor:
        return torch.tensor([float(c) for c in self.architecture])


@dataclass
class Manifest:
    """Parameters:
    teacher_config (`dict`): the full U-Net's config.
    scheduler_config (`dict`): the training noise schedule (prediction type included).
    resolution (`int`): the U-Net's input size.
    text_encoder (`dict`): `router.encoder.EncoderConfig` fields.
    teacher_macs (`int`): MACs of the full U-Net per call (same counter as the codes).
    codes (`list[CodeEntry]`): the K codes.
    sampling (`dict`): default steps and guidance scale.
    files (`dict[str, str]`): sha256 of every file, by path relative to the bundle.
    info (`dict`): free-form training summary.
    text_adapter (`dict`, *optional*): `pruning.conditioning.TextAdapterConfig` fields of the teacher's text adapter
        (stored in `text_adapter/`), None when the U-Nets read the encoder's token states directly.
    """

    teacher_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    resolution: int
    text_encoder: dict[str, Any]
    teacher_macs: int
    codes: list[CodeEntry]
    sampling: dict[str, Any] = field(default_factory=lambda: {"steps": 25, "guidance_scale": 4.0})
    files: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    text_adapter: dict[str, Any] | None = None

    @property
    def num_codes(self) -> int:
        return len(self.codes)

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", "epsilon"))


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Record the checksum of every file under `folder` (except the manifest) and write `manifest.json`."""
    folder = Path(folder)
    manifest.files = {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    data = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "num_codes": manifest.num_codes, **asdict(manifest)}
    data["prediction_type"] = manifest.prediction_type
    (folder / MANIFEST).write_text(json.dumps(data, indent=1) + "\n")
    return folder / MANIFEST


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and validate `manifest.json`; with `verify`, check that every listed file exists with its checksum."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(folder, "bundle folder not found")
    path = folder / MANIFEST
    data = read_json_object(path, BundleError)
    if data.get("format") != BUNDLE_FORMAT:
        raise BundleError(path, f"not a bundle manifest (format {data.get('format')!r})")
    if data.get("version") != BUNDLE_VERSION:
        raise BundleError(path, f"unsupported bundle version {data.get('version')!r}")
    try:
        codes = [CodeEntry(**entry) for entry in data["codes"]]
        manifest = Manifest(
            teacher_config=dict(data["teacher_config"]),
            scheduler_config=dict(data["scheduler_config"]),
            resolution=int(data["resolution"]),
            text_encoder=dict(data["text_encoder"]),
            teacher_macs=int(data["teacher_macs"]),
            codes=codes,
            sampling=dict(data.get("sampling", {})),
            files=dict(data["files"]),
            info=dict(data.get("info", {})),
            text_adapter=dict(data["text_adapter"]) if data.get("text_adapter") else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(path, f"missing or invalid field ({e})") from None
    if [c.code for c in codes] != list(range(len(codes))) or not codes:
        raise BundleError(path, "codes must be numbered 0..K-1")
    if verify:
        for relative, sha in manifest.files.items():
            file = folder / relative
            if not file.is_file():
                raise BundleError(file, "listed in manifest.json but missing")
            if file_sha256(file) != sha:
                raise BundleError(file, "checksum mismatch with manifest.json: the file is corrupt or was replaced")
    return manifest


def load_code_experts(
    folder: str | Path, manifest: Manifest, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> list[nn.Module]:
    """Load every code's sliced U-Net (checksums already checked by [`read_manifest`])."""
    folder = Path(folder)
    experts = []
    for entry in manifest.codes:
        unet, info = load_expert(folder / entry.expert, device=device, dtype=dtype, verify=False)
        if not torch.equal(info.arch, entry.architecture_tensor()):
            raise BundleError(folder / entry.expert, f"expert architecture differs from code {entry.code} in manifest")
        experts.append(unet)
    return experts


def load_bundle_text_adapter(
    folder: str | Path, manifest: Manifest, device: str | torch.device = "cpu"
) -> TextAdapter | None:
    """The bundle's text adapter (frozen), or None when its U-Nets read the encoder's token states directly."""
    if manifest.text_adapter is None:
        return None
    folder = Path(folder) / TEXT_ADAPTER
    adapter = TextAdapter.load(folder, device, sha256=manifest.files.get(f"{TEXT_ADAPTER}/{ADAPTER_WEIGHTS}"))
    if adapter.config.model_dump() != manifest.text_adapter:
        raise BundleError(folder, f"text adapter config differs from manifest.json ({manifest.text_adapter})")
    return adapter
