"""The bundle: the unit that training produces and the server loads.

```
bundle/
  manifest.json        format, teacher config, noise schedule, resolution, text encoder, K, and per code:
                       architecture, MACs per U-Net call, params, training share; sha256 of every file
  router/              config.json + model.safetensors (see router.model.Router)
  experts/<code>/      one sliced U-Net per code (see aptp.formats.expert)
  text_adapter/        only when the teacher has one: config.json + model.safetensors (see aptp.conditioning.adapter),
                       the teacher's trained adapter, shared by every code
  vae/, text_encoder/, tokenizer/
                       only for a latent-diffusion bundle cut from a diffusers pipeline: its own VAE, CLIP text encoder
                       and tokenizer, as diffusers saves them (the router reads `text_encoder`, a sentence encoder)
```
Reading a bundle checks the manifest's fields and every file's checksum before anything is built; errors name the
file. This module knows the layout; the router is loaded by `router.model.Router.load`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

from aptp.conditioning.adapter import ADAPTER_WEIGHTS, TEXT_ADAPTER, TextAdapter, TextAdapterConfig
from aptp.conditioning.encoder import EncoderConfig
from aptp.formats.expert import load_expert
from aptp.formats.files import ModelFileError, file_sha256, read_json_object, validate_description, write_description
from aptp.sampling import SamplingConfig
from pruning.space import ArchitectureSpace

BUNDLE_FORMAT = "aptp-bundle"
BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
LATENT_COMPONENTS = ("tokenizer", "text_encoder", "vae")  # folders of a bundle cut from a diffusers pipeline


class BundleError(ModelFileError):
    """A bundle is incomplete, corrupt, or inconsistent; the message names the file."""


class CodeEntry(BaseModel):
    """One architecture code of a bundle.

    Parameters:
        code (`int`): its index (the router's output).
        expert (`str`): the expert folder, relative to the bundle.
        architecture (`str`): the hard architecture vector as a string of 0/1.
        macs (`int`): MACs of one U-Net call at batch 1 at the bundle's resolution.
        params (`int`): parameters of the sliced U-Net.
        training_share (`float`): share of training prompts routed to this code.
    """

    model_config = ConfigDict(extra="forbid")

    code: int = Field(ge=0)
    expert: str
    architecture: str = Field(pattern="^[01]+$")
    macs: int = Field(gt=0)
    params: int = Field(gt=0)
    training_share: float = Field(ge=0.0, le=1.0)

    def architecture_tensor(self) -> torch.Tensor:
        return torch.tensor([float(c) for c in self.architecture])


class LatentComponents(BaseModel):
    """What a bundle cut from a diffusers Stable Diffusion pipeline carries beside its experts, so the bundle folder
    alone serves: the pipeline's `vae/`, `text_encoder/` and `tokenizer/` folders, as diffusers saves them.

    Parameters:
        source (`str`): the pipeline folder the bundle was cut from (for the record).
        vae_scale_factor (`int`): pixels per latent along each side.
    """

    model_config = ConfigDict(extra="forbid")

    source: str
    vae_scale_factor: int = Field(ge=1)


class Manifest(BaseModel):
    """`manifest.json` of a bundle.

    Parameters:
        teacher_config (`dict`): the full U-Net's config.
        scheduler_config (`dict`): the training noise schedule (prediction type included).
        resolution (`int`): the U-Net's input size.
        text_encoder (`EncoderConfig`): the frozen prompt encoder.
        teacher_macs (`int`): MACs of the full U-Net per call (same counter as the codes).
        codes (`list[CodeEntry]`): the K codes, numbered 0..K-1.
        sampling (`SamplingConfig`): default steps and guidance scale.
        files (`dict[str, str]`): sha256 of every file, by path relative to the bundle.
        info (`dict`): free-form training summary.
        text_adapter (`TextAdapterConfig`, *optional*): the teacher's text adapter (stored in `text_adapter/`), None
            when the U-Nets read the encoder's token states directly.
        latent (`LatentComponents`, *optional*): for a bundle cut from a diffusers pipeline, its VAE, CLIP text
            encoder and tokenizer; `resolution` is then the latent size, and `text_encoder` the router's encoder.
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["aptp-bundle"] = BUNDLE_FORMAT
    version: Literal[1] = BUNDLE_VERSION
    num_codes: int = 0  # written for readers of the JSON; always len(codes)
    teacher_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    resolution: int = Field(ge=1)
    text_encoder: EncoderConfig
    teacher_macs: int = Field(gt=0)
    codes: list[CodeEntry]
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    files: dict[str, str] = Field(default_factory=dict)
    info: dict[str, Any] = Field(default_factory=dict)
    text_adapter: TextAdapterConfig | None = None
    latent: LatentComponents | None = None
    prediction_type: str = ""  # written for readers of the JSON; always the scheduler's

    @field_validator("codes")
    @classmethod
    def _numbered_in_order(cls, codes: list[CodeEntry]) -> list[CodeEntry]:
        if not codes or [c.code for c in codes] != list(range(len(codes))):
            raise ValueError(f"codes must be numbered 0..K-1 in order, got {[c.code for c in codes]}")
        return codes

    @model_validator(mode="after")
    def _derived_fields_agree(self) -> Manifest:
        if self.num_codes and self.num_codes != len(self.codes):
            raise ValueError(f"num_codes is {self.num_codes} but {len(self.codes)} codes are listed")
        scheduled = str(self.scheduler_config.get("prediction_type", "epsilon"))
        if self.prediction_type and self.prediction_type != scheduled:
            raise ValueError(f"prediction_type {self.prediction_type!r} differs from the scheduler's {scheduled!r}")
        self.num_codes, self.prediction_type = len(self.codes), scheduled
        return self


def write_manifest(folder: str | Path, manifest: Manifest) -> Path:
    """Record the checksum of every file under `folder` (except the manifest) and write `manifest.json`."""
    folder = Path(folder)
    manifest.files = {
        str(p.relative_to(folder)): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return write_description(folder / MANIFEST, manifest)


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
    manifest = validate_description(path, Manifest, data, BundleError)
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
    spaces: dict[str, ArchitectureSpace] = {}  # experts of one teacher share a space: its MACs are traced once
    for entry in manifest.codes:
        unet, info = load_expert(folder / entry.expert, device=device, dtype=dtype, verify=False)
        check_code_architecture(folder, entry, info.arch)
        space = spaces.setdefault(json.dumps(info.space.to_dict(), sort_keys=True), info.space)
        # The costs a server reports and schedules by are recounted from the expert itself, not trusted.
        macs, params = space.macs(info.arch, manifest.resolution), sum(p.numel() for p in unet.parameters())
        check_code_costs(folder, manifest, entry, macs, params, space.total_macs(manifest.resolution))
        experts.append(unet)
    return experts


def check_code_architecture(folder: Path, entry: CodeEntry, arch: torch.Tensor) -> None:
    """The expert folder of code `entry` (in bundle `folder`) holds the architecture the manifest gives it."""
    if not torch.equal(arch, entry.architecture_tensor()):
        raise BundleError(folder / entry.expert, f"expert architecture differs from code {entry.code} in {MANIFEST}")


def check_code_costs(
    folder: Path, manifest: Manifest, entry: CodeEntry, macs: int, params: int, teacher_macs: int
) -> None:
    """What the manifest states of code `entry`'s costs and the teacher's MACs is what its expert counts (at the
    bundle's resolution); the error names the manifest's field."""
    counted = {
        f"codes[{entry.code}].macs": (entry.macs, macs),
        f"codes[{entry.code}].params": (entry.params, params),
        "teacher_macs": (manifest.teacher_macs, teacher_macs),
    }
    for field, (stated, actual) in counted.items():
        if stated != actual:
            raise BundleError(folder / MANIFEST, f"{field} is {stated}, but the expert counts {actual}")


def load_bundle_text_adapter(
    folder: str | Path, manifest: Manifest, device: str | torch.device = "cpu"
) -> TextAdapter | None:
    """The bundle's text adapter (frozen), or None when its U-Nets read the encoder's token states directly."""
    if manifest.text_adapter is None:
        return None
    folder = Path(folder) / TEXT_ADAPTER
    adapter = TextAdapter.load(folder, device, sha256=manifest.files.get(f"{TEXT_ADAPTER}/{ADAPTER_WEIGHTS}"))
    if adapter.config != manifest.text_adapter:
        raise BundleError(
            folder, f"text adapter config differs from manifest.json ({manifest.text_adapter.model_dump()})"
        )
    return adapter


def load_latent_components(
    folder: str | Path, manifest: Manifest, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """`(tokenizer, text_encoder, vae)` of a bundle cut from a diffusers pipeline (checksums already checked by
    `read_manifest`); a missing component is an error naming its folder."""
    from aptp.formats.diffusers import load_component

    folder = Path(folder)
    return tuple(load_component(folder, name, device, dtype, BundleError) for name in LATENT_COMPONENTS)
