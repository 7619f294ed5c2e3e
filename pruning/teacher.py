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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .conditioning import ADAPTER_CONFIG, ADAPTER_WEIGHTS, TEXT_ADAPTER, TextAdapter
from .files import ModelFileError, file_sha256, load_matching_state, read_json_object, stored_tensor

TEACHER_FORMAT = "aptp-teacher"
TEACHER_VERSION = 1
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class TeacherFileError(ModelFileError):
    """A teacher folder is missing a file or has a corrupt one; the message names the file."""


@dataclass
class TeacherSpec:
    """What `teacher.json` records.

    Parameters:
        resolution (`int`): the U-Net's input size (pixels for a pixel-space model).
        text_encoder (`dict`): `router.encoder.EncoderConfig` fields.
        scheduler_config (`dict`): the training noise schedule.
        sampling (`dict`): default `steps` and `guidance_scale`.
        training (`dict`): a summary of how it was trained.
        text_adapter (`dict`, *optional*): `TextAdapterConfig` fields when the teacher reads the encoder's token
            states through a trained adapter (`text_adapter/`), None when it reads them directly.
    """

    resolution: int
    text_encoder: dict[str, Any]
    scheduler_config: dict[str, Any]
    sampling: dict[str, Any] = field(default_factory=lambda: {"steps": 25, "guidance_scale": 4.0})
    training: dict[str, Any] = field(default_factory=dict)
    text_adapter: dict[str, Any] | None = None

    @property
    def context_length(self) -> int:
        """Tokens the U-Net reads per prompt (its cross-attention's key length): the encoder's padded length, plus
        the adapter's summary tokens."""
        summary = int((self.text_adapter or {}).get("summary_tokens", 0))
        return int(self.text_encoder.get("max_length", 77)) + summary


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
    description = {
        "format": TEACHER_FORMAT,
        "version": TEACHER_VERSION,
        "resolution": spec.resolution,
        "text_encoder": spec.text_encoder,
        "sampling": spec.sampling,
        "training": spec.training,
        "sha256": {UNET_WEIGHTS: file_sha256(folder / UNET_WEIGHTS)},
    }
    if text_adapter is not None:
        hashes = text_adapter.save(folder / TEXT_ADAPTER, storage_dtype)
        description["text_adapter"] = text_adapter.config.model_dump()
        description["sha256"].update({f"{TEXT_ADAPTER}/{name}": digest for name, digest in hashes.items()})
    (folder / "teacher.json").write_text(json.dumps(description, indent=1) + "\n")
    return folder


def _teacher_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, TeacherFileError)


def load_teacher(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[nn.Module, TeacherSpec]:
    """Load a teacher folder written by [`save_teacher`] as `dtype` (default float32), checking the weights'
    checksum and shapes."""
    from diffusers import UNet2DConditionModel

    folder = Path(folder)
    description = _teacher_json(folder / "teacher.json")
    if description.get("format") != TEACHER_FORMAT:
        raise TeacherFileError(folder / "teacher.json", f"not a teacher description ({description.get('format')!r})")
    config = _teacher_json(folder / "unet" / "config.json")
    scheduler_config = _teacher_json(folder / "scheduler" / "scheduler_config.json")
    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(config)
    except (TypeError, ValueError, KeyError) as e:
        raise TeacherFileError(folder / "unet" / "config.json", f"cannot build the U-Net ({e})") from None
    sha256 = description.get("sha256", {}).get(UNET_WEIGHTS)
    weights = folder / UNET_WEIGHTS
    state = load_matching_state(weights, unet.state_dict(), sha256, device, TeacherFileError, dtype or torch.float32)
    unet.load_state_dict(state, strict=True, assign=True)
    unet.to(device)
    unet.eval()
    try:
        spec = TeacherSpec(
            resolution=int(description["resolution"]),
            text_encoder=dict(description["text_encoder"]),
            scheduler_config=scheduler_config,
            sampling=dict(description.get("sampling", {})),
            training=dict(description.get("training", {})),
            text_adapter=dict(description["text_adapter"]) if description.get("text_adapter") else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise TeacherFileError(folder / "teacher.json", f"missing or invalid field ({e})") from None
    return unet, spec


def load_text_adapter(folder: str | Path, device: str | torch.device = "cpu") -> TextAdapter | None:
    """The teacher folder's text adapter (frozen, checked against the checksums in `teacher.json`), or None for a
    teacher that reads the encoder's token states directly."""
    folder = Path(folder)
    description = _teacher_json(folder / "teacher.json")
    if not description.get("text_adapter"):
        return None
    hashes = description.get("sha256", {})
    config_hash = hashes.get(f"{TEXT_ADAPTER}/{ADAPTER_CONFIG}")
    config_path = folder / TEXT_ADAPTER / ADAPTER_CONFIG
    if config_hash is not None and config_path.is_file() and file_sha256(config_path) != config_hash:
        raise TeacherFileError(config_path, "checksum mismatch")
    return TextAdapter.load(folder / TEXT_ADAPTER, device, sha256=hashes.get(f"{TEXT_ADAPTER}/{ADAPTER_WEIGHTS}"))
