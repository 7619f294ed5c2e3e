"""Resumable training state on disk, without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is written to a temporary folder and renamed into place, so a kill during the write leaves the
previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSORS = "tensors.safetensors"
STATE = "state.json"


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    folder: str | Path,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> None:
    """Write `modules` (name -> module or tensor dict), the optimizer and a JSON-able `state` to `folder`."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        items = module.state_dict() if isinstance(module, torch.nn.Module) else module
        tensors.update({f"{name}/{k}": v.detach().contiguous().cpu() for k, v in items.items()})
    meta: dict[str, Any] = {"state": state}
    if optimizer is not None:
        optim_tensors, meta["optimizer"] = _flatten_optimizer(optimizer)
        tensors.update({f"optimizer/{k}": v for k, v in optim_tensors.items()})
    save_file(tensors, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps(meta, indent=1) + "\n")
    old = folder.with_name(folder.name + ".old")
    if folder.exists():  # otherwise `old` may hold the only complete checkpoint: keep it until `tmp` is in place
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: str | Path,
    modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, Any]:
    """Restore what [`save_checkpoint`] wrote, in place; returns the saved `state`."""
    folder = Path(folder)
    try:
        tensors = load_file(str(folder / TENSORS))
        meta = json.loads((folder / STATE).read_text())
    except (OSError, ValueError, SafetensorError) as e:
        raise ValueError(f"{folder}: unreadable checkpoint ({e})") from None
    for name, module in modules.items():
        prefix = f"{name}/"
        items = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if isinstance(module, torch.nn.Module):
            module.load_state_dict(items, strict=True)
        else:
            missing = set(module) - set(items)
            if missing:
                raise ValueError(f"{folder}: checkpoint lacks {name} tensors {sorted(missing)[:3]}")
            for k in module:
                module[k].copy_(items[k])
    if optimizer is not None:
        optim = {k[len("optimizer/") :]: v for k, v in tensors.items() if k.startswith("optimizer/")}
        optimizer.load_state_dict(_unflatten_optimizer(optim, meta["optimizer"]))
    return meta["state"]


def latest_checkpoint(run_dir: str | Path, name: str = "checkpoint") -> Path | None:
    """The run's checkpoint, or the previous one if a kill fell between the two renames of a save."""
    for candidate in (name, name + ".old"):
        folder = Path(run_dir) / candidate
        if (folder / STATE).is_file():
            return folder
    return None
