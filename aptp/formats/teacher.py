"""Teacher folders: the full U-Net that APTP prunes, with what is needed to sample from it.

```
teacher/
  teacher.json                 format, resolution, text encoder, sampling defaults, checksums, training summary
  unet/config.json             diffusers UNet2DConditionModel config
  unet/diffusion_pytorch_model.safetensors
  scheduler/scheduler_config.json   the training noise schedule (samplers are built from it)
  text_adapter/config.json     optional: the trainable text adapter between the frozen encoder and the U-Net
  text_adapter/model.safetensors
```
The `unet/` folder is a plain diffusers folder, so `UNet2DConditionModel.from_pretrained("teacher/unet")` reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from aptp.conditioning.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEXT_ADAPTER, TextAdapter, TextAdapterConfig
from aptp.conditioning.conditioner import Conditioner
from aptp.conditioning.encoder import EncoderConfig
from aptp.formats.files import (
    ModelFileError,
    file_sha256,
    load_matching_state,
    read_json_object,
    stored_tensor,
    validate_description,
    write_description,
)
from aptp.sampling import SamplingConfig

TEACHER_FORMAT = "aptp-teacher"
TEACHER_VERSION = 1
TEACHER_DESCRIPTION = "teacher.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class TeacherFileError(ModelFileError):
    """A teacher folder is missing a file or has a corrupt one; the message names the file."""


class TeacherSpec(BaseModel):
    """What a teacher is, beside its weights (`teacher.json` without the bookkeeping, plus the noise schedule).

    Parameters:
        resolution (`int`): the U-Net's input size (pixels for a pixel-space model).
        text_encoder (`EncoderConfig`): the frozen prompt encoder.
        scheduler_config (`dict`): the training noise schedule (stored in `scheduler/`, not in `teacher.json`).
        sampling (`SamplingConfig`): default steps and guidance scale.
        training (`dict`): a summary of how it was trained.
        text_adapter (`TextAdapterConfig`, *optional*): the trained adapter between encoder and U-Net
            (`text_adapter/`), None when the U-Net reads the encoder's token states directly.
    """

    model_config = ConfigDict(extra="forbid")

    resolution: int = Field(ge=1)
    text_encoder: EncoderConfig
    scheduler_config: dict[str, Any] = Field(default_factory=dict, exclude=True)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    training: dict[str, Any] = Field(default_factory=dict)
    text_adapter: TextAdapterConfig | None = None

    @property
    def context_length(self) -> int:
        """Tokens the U-Net reads per prompt (its cross-attention's key length): the encoder's padded length, plus
        the adapter's summary tokens."""
        summary = self.text_adapter.summary_tokens if self.text_adapter is not None else 0
        return self.text_encoder.max_length + summary


class TeacherDescription(TeacherSpec):
    """`teacher.json`: the spec, its format and version, and the sha256 of its weight files by relative path."""

    format: Literal["aptp-teacher"] = TEACHER_FORMAT
    version: Literal[1] = TEACHER_VERSION
    sha256: dict[str, str] = Field(default_factory=dict)


def save_teacher(
    unet: nn.Module,
    spec: TeacherSpec,
    folder: str | Path,
    storage_dtype: torch.dtype = torch.float32,
    text_adapter: TextAdapter | None = None,
) -> Path:
    """Write a teacher folder (with its text adapter, if it has one); floating weights are stored as
    `storage_dtype`."""
    folder = Path(folder)
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in unet.config.items() if not k.startswith("_")}}
    (folder / "unet" / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    state = {k: stored_tensor(v, storage_dtype) for k, v in unet.state_dict().items()}
    save_file(state, str(folder / UNET_WEIGHTS), metadata={"format": TEACHER_FORMAT})
    scheduler = {k: v for k, v in spec.scheduler_config.items() if not k.startswith("_")}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    hashes = {UNET_WEIGHTS: file_sha256(folder / UNET_WEIGHTS)}
    adapter_config = None
    if text_adapter is not None:
        adapter_hashes = text_adapter.save(folder / TEXT_ADAPTER, storage_dtype)
        adapter_config = text_adapter.config
        hashes.update({f"{TEXT_ADAPTER}/{name}": digest for name, digest in adapter_hashes.items()})
    fields = spec.model_dump(exclude={"text_adapter"})
    description = TeacherDescription(**fields, text_adapter=adapter_config, sha256=hashes)
    write_description(folder / TEACHER_DESCRIPTION, description)
    return folder


def read_teacher_description(folder: str | Path) -> TeacherDescription:
    """`teacher.json` of `folder`, validated; errors name the file (and the field)."""
    from aptp.formats.diffusers import is_pipeline_folder  # (it builds teacher specs of pipeline folders)

    path = Path(folder) / TEACHER_DESCRIPTION
    if not path.is_file() and is_pipeline_folder(folder):
        raise TeacherFileError(
            folder,
            "a diffusers pipeline folder, not a teacher folder (teacher.json): the commands that serve, inspect or "
            "train read it as it is, through their own loaders",
        )
    data = read_json_object(path, TeacherFileError)
    if data.get("format") != TEACHER_FORMAT:
        raise TeacherFileError(path, f"not a teacher description ({data.get('format')!r})")
    return validate_description(path, TeacherDescription, data, TeacherFileError)


def load_teacher(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, TeacherSpec]:
    """Load a teacher folder written by [`save_teacher`] as `dtype` (default float32), checking the weights'
    checksum and shapes."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    description = read_teacher_description(folder)
    config = read_json_object(folder / "unet" / "config.json", TeacherFileError)
    scheduler_config = read_json_object(folder / "scheduler" / "scheduler_config.json", TeacherFileError)
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise TeacherFileError(folder / "unet" / "config.json", f"cannot build the U-Net ({e})") from None
    if unet.config.out_channels != 3:
        raise TeacherFileError(
            folder / "unet" / "config.json",
            f"the U-Net makes {unet.config.out_channels} channels: a teacher folder holds a pixel-space U-Net that "
            "makes RGB images (3); a latent-diffusion U-Net needs its VAE: serve its diffusers pipeline folder",
        )
    sha256 = description.sha256.get(UNET_WEIGHTS)
    weights = folder / UNET_WEIGHTS
    state = load_matching_state(weights, unet.state_dict(), sha256, device, TeacherFileError, dtype or torch.float32)
    unet.load_state_dict(state, strict=True, assign=True)
    unet.to(device)
    unet.eval()
    spec_fields = description.model_dump(include=set(TeacherSpec.model_fields) - {"scheduler_config"})
    spec = TeacherSpec(**spec_fields, scheduler_config=scheduler_config)
    return unet, spec


def load_text_adapter(folder: str | Path, device: str | torch.device = "cpu") -> TextAdapter | None:
    """The teacher folder's text adapter (frozen, checked against the checksums in `teacher.json`), or None for a
    teacher that reads the encoder's token states directly."""
    folder = Path(folder)
    description = read_teacher_description(folder)
    if description.text_adapter is None:
        return None
    hashes = description.sha256
    config_hash = hashes.get(f"{TEXT_ADAPTER}/{ADAPTER_CONFIG}")
    config_path = folder / TEXT_ADAPTER / ADAPTER_CONFIG
    if config_hash is not None and config_path.is_file() and file_sha256(config_path) != config_hash:
        raise TeacherFileError(config_path, "checksum mismatch")
    return TextAdapter.load(folder / TEXT_ADAPTER, device, sha256=hashes.get(f"{TEXT_ADAPTER}/{ADAPTER_WEIGHTS}"))


def load_teacher_conditioner(
    folder: str | Path,
    spec: TeacherSpec,
    device: str | torch.device = "cpu",
    text_encoder: EncoderConfig | None = None,
) -> Conditioner:
    """What the teacher's U-Net reads: its encoder (or `text_encoder`, when a job overrides it) and its text
    adapter."""
    return Conditioner.from_config(text_encoder or spec.text_encoder, load_text_adapter(folder, device), device)
