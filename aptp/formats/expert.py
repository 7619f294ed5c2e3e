"""Expert files: one sliced U-Net on disk, as the full model's config, the kept indices, and safetensors weights.

```
expert/
  config.json                          the full (teacher) UNet2DConditionModel config
  expert.json                          format, text length, feed-forward groups, keep-sets, checksum, params
  diffusion_pytorch_model.safetensors  the sliced weights
```
Loading rebuilds the full model on the `meta` device, slices it with the stored keep-sets, then checks every
tensor's name and shape against the file before assigning it. Nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file
from torch import nn

from aptp.formats.files import (
    ModelFileError,
    file_sha256,
    load_matching_state,
    read_json_object,
    stored_tensor,
    validate_description,
    write_description,
)
from pruning.slicing import apply_keep_sets
from pruning.space import DEFAULT_FEED_FORWARD_GROUPS, ArchitectureSpace

EXPERT_FORMAT = "aptp-expert"
EXPERT_VERSION = 1
CONFIG_NAME = "config.json"
EXPERT_NAME = "expert.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class ExpertFileError(ModelFileError):
    """An expert folder is missing, corrupt, or does not match its own description. The message names the file."""


class WeightsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    sha256: str


class ExpertDescription(BaseModel):
    """`expert.json`: how to rebuild a sliced U-Net from the full model's `config.json`.

    Parameters:
        text_len (`int`): cross-attention key length the MAC model counts with.
        feed_forward_groups (`int`): gate groups over each feed-forward inner width.
        params (`int`): parameters of the sliced model.
        weights (`WeightsFile`): the safetensors file and its sha256.
        keep_sets (`dict[str, list[int]]`): per prunable unit, the kept gate indices (depth units: `[0]` kept,
            `[]` dropped).
    """

    model_config = ConfigDict(extra="forbid")

    format: Literal["aptp-expert"] = EXPERT_FORMAT
    version: Literal[1] = EXPERT_VERSION
    text_len: int = Field(ge=1)
    feed_forward_groups: int = Field(ge=1)
    params: int = Field(ge=0)
    weights: WeightsFile
    keep_sets: dict[str, list[int]]


@dataclass
class ExpertInfo:
    """What `expert.json` says about a sliced U-Net.

    Parameters:
        space (`ArchitectureSpace`): the full model's space (rebuilt from `config.json`).
        arch (`torch.Tensor`): the hard architecture vector, `(space.dim,)`.
        params (`int`): parameters of the sliced model.
        sha256 (`str`): checksum of the weights file.
    """

    space: ArchitectureSpace
    arch: torch.Tensor
    params: int
    sha256: str


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ExpertFileError)


def save_expert(
    unet: nn.Module,
    space: ArchitectureSpace,
    arch: torch.Tensor,
    path: str | Path,
    storage_dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the sliced `unet` (made by `slice_unet(teacher, space, arch)`) to the folder `path`, its floating
    weights stored as `storage_dtype`."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: stored_tensor(v, storage_dtype) for k, v in unet.state_dict().items()}
    weights = folder / WEIGHTS_NAME
    save_file(state, str(weights), metadata={"format": EXPERT_FORMAT})
    config = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in space.to_dict()["unet_config"].items()}}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    description = ExpertDescription(
        text_len=space.text_len,
        feed_forward_groups=_feed_forward_groups(space),
        params=sum(v.numel() for v in state.values()),
        weights=WeightsFile(file=WEIGHTS_NAME, sha256=file_sha256(weights)),
        keep_sets=space.keep_sets(arch),
    )
    write_description(folder / EXPERT_NAME, description)
    return folder


def _feed_forward_groups(space: ArchitectureSpace) -> int:
    groups = [u.num_gates for u in space.width_units if u.kind.value == "ff"]
    return max(groups) if groups else DEFAULT_FEED_FORWARD_GROUPS


def is_expert_folder(path: str | Path) -> bool:
    return (Path(path) / EXPERT_NAME).is_file()


def read_expert_info(path: str | Path) -> tuple[ExpertInfo, nn.Module]:
    """Read `config.json` and `expert.json` and build the sliced model's skeleton on the `meta` device."""
    from diffusers import UNet2DConditionModel

    folder = Path(path)
    if not folder.is_dir():
        raise ExpertFileError(folder, "expert folder not found")
    data = _read_json(folder / EXPERT_NAME)
    if data.get("format") != EXPERT_FORMAT:
        raise ExpertFileError(folder / EXPERT_NAME, f"not an expert description (format {data.get('format')!r})")
    if data.get("version") != EXPERT_VERSION:
        raise ExpertFileError(folder / EXPERT_NAME, f"unsupported version {data.get('version')!r}")
    description = validate_description(folder / EXPERT_NAME, ExpertDescription, data, ExpertFileError)
    config = _read_json(folder / CONFIG_NAME)
    try:
        with torch.device("meta"):
            skeleton = UNet2DConditionModel.from_config(config)
        space = ArchitectureSpace.from_unet(
            skeleton, text_len=description.text_len, feed_forward_groups=description.feed_forward_groups
        )
        arch = space.from_keep_sets(description.keep_sets)
        apply_keep_sets(skeleton, space, description.keep_sets)
        sha256, params = description.weights.sha256, description.params
    except (KeyError, TypeError, ValueError) as e:
        problem = f"does not describe a valid expert of {CONFIG_NAME} ({e})"
        raise ExpertFileError(folder / EXPERT_NAME, problem) from None
    return ExpertInfo(space=space, arch=arch, params=params, sha256=sha256), skeleton


def load_expert(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, verify: bool = True
) -> tuple[nn.Module, ExpertInfo]:
    """Load a sliced U-Net saved by [`save_expert`] as `dtype` (default float32). `verify` checks the weights'
    sha256 first."""
    folder = Path(path)
    info, unet = read_expert_info(folder)
    weights = folder / WEIGHTS_NAME
    expected = unet.state_dict()
    sha256 = info.sha256 if verify else None
    state = load_matching_state(weights, expected, sha256, device, ExpertFileError, dtype or torch.float32)
    unet.load_state_dict(state, strict=True, assign=True)
    unet.to(device)
    leftover = [n for n, t in [*unet.named_parameters(), *unet.named_buffers()] if t.is_meta]
    if leftover:
        raise ExpertFileError(weights, f"tensors were not loaded: {leftover[:3]}")
    return unet.eval(), info
