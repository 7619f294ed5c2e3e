"""The scaffolding every training stage shares: a run folder with its config, a JSONL log, periodic checkpoints
and exact resumption (data, noise and timesteps are functions of the step, so only weights and optimizer state
need saving)."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError


class RunSettings(BaseModel):
    """Fields every stage's config has."""

    model_config = ConfigDict(extra="forbid")
    # Fields (dotted paths) a run may resume with changed: runtime settings, outputs, and the step count (a
    # finished run re-run with more steps continues from its checkpoint).
    RESUME_MAY_CHANGE: ClassVar[frozenset[str]] = frozenset(
        {"threads", "device", "checkpoint_minutes", "log_every", "export", "export_dtype"}
        | {"steps", "optim.steps", "expert.steps"}
    )

    out: str
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    checkpoint_minutes: float = Field(5.0, gt=0)
    log_every: int = Field(10, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="the U-Net passes under bfloat16 or float16 autocast (weights and optimiser stay float32; "
        "fp16 scales the loss)",
    )
    gradient_checkpointing: bool = Field(False, description="recompute U-Net activations in backward to save memory")
    phrasing: Literal["rich", "templates"] = Field(
        "rich",
        description="the embedded shapes domain's captions: the rich generator, or the first templates (which the "
        "shipped teacher was trained on: its search, fine-tuning and baseline use them); no effect on an image-caption "
        "folder",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, description="U-Net passes per process and step: its share of the batch runs in this many parts"
    )


TEACHER_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class DistillingSettings(RunSettings):
    """Fields of the stages that distil from a frozen teacher (fine-tuning, the baseline)."""

    teacher_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="the frozen teacher's weights (it only distils); students train in float32"
    )

    @property
    def torch_teacher_dtype(self) -> torch.dtype:
        return TEACHER_DTYPES[self.teacher_dtype]

    @model_validator(mode="after")
    def _one_half_precision(self) -> DistillingSettings:
        autocast = {"bf16": "bfloat16", "fp16": "float16"}.get(self.mixed_precision)
        if autocast and self.teacher_dtype not in ("float32", autocast):
            raise ValueError(
                f"teacher_dtype {self.teacher_dtype} under mixed_precision {self.mixed_precision}: hold the teacher in "
                f"{autocast} (the autocast's dtype) or float32"
            )
        return self


def _dotted(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dict -> {"optim.steps": ..., ...}."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            flat.update(_dotted(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


class TrainingRun:
    """A resumable run in `settings.out`.

    Parameters:
        settings (`RunSettings`): the stage's config (written to `config.json`).
        modules (`dict`): what a checkpoint holds besides the optimizer (modules or tensor dicts), by name.
        optimizer (`torch.optim.Optimizer`, *optional*): saved and restored with them.
        checkpoint_name (`str`): folder name inside the run (stages with several parts use one per part).
    """

    def __init__(
        self,
        settings: RunSettings,
        modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
        optimizer: torch.optim.Optimizer | None,
        checkpoint_name: str = "checkpoint",
        log_name: str = "log.jsonl",
        main: bool = True,
        scaler: torch.amp.GradScaler | None = None,
    ):
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.folder = Path(settings.out)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.checkpoint_name = checkpoint_name
        self._refuse_a_foreign_checkpoint()
        self.main = main  # of several processes, only the main one writes
        self.scaler = scaler  # fp16's loss scale travels with the checkpoint
        if main:
            (self.folder / "config.json").write_text(settings.model_dump_json(indent=1) + "\n")
        self.modules, self.optimizer = modules, optimizer
        self.state: dict[str, Any] = {"step": 0, "elapsed_seconds": 0.0}
        self._log_path = self.folder / log_name
        self._started = self._last_save = time.time()

    def _refuse_a_foreign_checkpoint(self) -> None:
        """A checkpoint in `out` left by a run with other settings must not be resumed (its weights and step would
        continue under the new config) nor have its config.json overwritten. Any part's checkpoint counts: a stage
        with several parts (phase 2's shared stage and experts) shares one config.json."""
        saved = self.folder / "config.json"
        parts = {p.name.removesuffix(".old") for p in self.folder.glob("checkpoint*") if p.is_dir()}
        if not any(latest_checkpoint(self.folder, part) for part in parts) or not saved.is_file():
            return
        written = json.loads(saved.read_text())
        # A field added since the run started counts as its default, not as a change; a field since renamed or
        # removed fails validation, and the file is compared as written.
        with contextlib.suppress(ValidationError):
            written = type(self.settings).model_validate(written).model_dump(mode="json")
        before = _dotted(written)
        now = _dotted(self.settings.model_dump(mode="json"))
        free = self.settings.RESUME_MAY_CHANGE
        changed = sorted(k for k in before.keys() | now.keys() if k not in free and before.get(k) != now.get(k))
        if changed:
            raise ConfigError(
                f"{self.folder}: holds a checkpoint of a run with other settings ({', '.join(changed)} differ); "
                "resume it with its own config (see its config.json), or choose another output folder"
            )

    def resume(self) -> int:
        """Restore the latest checkpoint if there is one; returns the step to start from."""
        checkpoint = latest_checkpoint(self.folder, self.checkpoint_name)
        if checkpoint is not None:
            self.state = load_checkpoint(checkpoint, self.modules, self.optimizer)
            if self.scaler is not None and "grad_scaler" in self.state:
                self.scaler.load_state_dict(self.state["grad_scaler"])
            print(f"resuming from {checkpoint} at step {self.state['step']}")
        self._started = self._last_save = time.time()
        self._elapsed_before = self.state["elapsed_seconds"]
        return int(self.state["step"])

    @property
    def elapsed_seconds(self) -> float:
        return self._elapsed_before + time.time() - self._started

    def should_log(self, step: int, total: int) -> bool:
        return step % self.settings.log_every == 0 or step == total - 1

    def log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        record = {**record, "seconds": round(self.elapsed_seconds, 1)}
        with open(self._log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, next_step: int) -> None:
        self.state.update(step=next_step, elapsed_seconds=self.elapsed_seconds)
        if self.scaler is not None:
            self.state["grad_scaler"] = self.scaler.state_dict()
        if not self.main:
            return
        save_checkpoint(self.folder / self.checkpoint_name, self.modules, self.optimizer, self.state)
        self._last_save = time.time()

    def maybe_save(self, next_step: int) -> None:
        """Checkpoint if `checkpoint_minutes` have passed since the last one."""
        if time.time() - self._last_save > self.settings.checkpoint_minutes * 60:
            self.save(next_step)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, floor: float = 0.0) -> float:
    """Learning-rate factor of step `step` (0-based): linear warm-up to 1 over `warmup_steps`, then a cosine from 1
    down to `floor` at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def check_finite(loss: torch.Tensor, step: int, run: TrainingRun) -> None:
    if not torch.isfinite(loss):
        raise RuntimeError(f"loss became {loss.item()} at step {step}; the last checkpoint is kept in {run.folder}")
