"""Checked reading of model folders: JSON descriptions and safetensors weights, with errors that name the file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file


class ModelFileError(ValueError):
    """A model folder is missing a file, or a file is corrupt or does not match its description.
    The message starts with the offending file's path."""

    def __init__(self, path: Path | str, problem: str):
        self.path = Path(path)
        super().__init__(f"{self.path}: {problem}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stored_tensor(tensor: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """A CPU, contiguous copy for saving, floating tensors cast to `storage_dtype`."""
    tensor = tensor.detach().cpu()
    return (tensor.to(storage_dtype) if tensor.is_floating_point() else tensor).contiguous()


def read_json_object(path: Path, error: type[ModelFileError] = ModelFileError) -> dict[str, Any]:
    if not path.is_file():
        raise error(path, "file not found")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise error(path, "expected a JSON object")
    return data


Description = TypeVar("Description", bound=BaseModel)


def validation_problems(error: ValidationError, limit: int = 5) -> str:
    """A pydantic error as one line: `field.path: message` per problem (the first `limit`)."""
    problems = [f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors()[:limit]]
    more = len(error.errors()) - limit
    return "; ".join(problems) + (f"; and {more} more" if more > 0 else "")


def validate_description(
    path: Path, model: type[Description], data: dict[str, Any], error: type[ModelFileError] = ModelFileError
) -> Description:
    """`data` (read from `path`) as `model`; a field that is missing or invalid is `error` naming the file and the
    field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(path, f"missing or invalid field ({validation_problems(e)})") from None


def write_description(path: Path, description: BaseModel, indent: int = 1) -> Path:
    """Write a descriptor as JSON (the fields in declaration order), newline-terminated."""
    path.write_text(json.dumps(description.model_dump(mode="json"), indent=indent) + "\n")
    return path


def load_matching_state(
    weights: Path,
    expected: dict[str, torch.Tensor],
    sha256: str | None,
    device: str | torch.device = "cpu",
    error: type[ModelFileError] = ModelFileError,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Read a safetensors file whose tensors must have exactly the names and shapes of `expected` (a state dict,
    typically of a `meta` model), after checking its sha256 when one is given. Floating tensors are cast to
    `dtype` (files may store half precision to stay small)."""
    if not weights.is_file():
        raise error(weights, "file not found")
    if sha256 is not None and file_sha256(weights) != sha256:
        raise error(weights, "checksum mismatch: the file is corrupt or was replaced")
    try:
        state = load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise error(weights, f"not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise error(weights, f"tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise error(
                weights, f"tensor {name} has shape {tuple(state[name].shape)}, the model needs {tuple(tensor.shape)}"
            )
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
