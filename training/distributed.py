"""The processes a training job runs in: one on a CPU or a single GPU, one per GPU under `accelerate launch`.

How a step is split. A step's global batch is `batch_size` samples. The router's side of phase 1 (the predictor,
the gate draws, the optimal-transport assignment, the contrastive, resource and spread losses) is cheap and runs on
the whole global batch in every process, from the same seeded draws, so the OT marginals and the B x B contrastive
targets are over the global batch as the method specifies and come out the same everywhere. The U-Net's side (the
teacher's and the gated student's forward, the distillation losses) is the expensive part: each process runs its
share of the rows. Every random draw of a step is made for the global batch and sliced, so a run's numbers do not
depend on how many processes share it (up to float reduction order). After backward, gradients are averaged over
the processes (`average_gradients`): the U-Net-side terms then become the global mean, and the router-side terms,
identical in every process, stay as they are. On one process every collective is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from .config import ConfigError


class Processes:
    """This process's place among the job's processes (accelerate's `PartialState`).

    Parameters:
        device (`str`): the configured device; under `accelerate launch` with several processes, each process uses
            the device accelerate assigns it instead.
        mixed_precision (`str`): `no`, `bf16` or `fp16`: autocast of the U-Net passes (weights and optimiser stay
            float32); fp16 scales the loss against underflow (`scale`, `step`).
    """

    def __init__(self, device: str = "cpu", mixed_precision: str = "no"):
        from accelerate import PartialState

        self.state = PartialState(cpu=device == "cpu")
        self.rank, self.world = self.state.process_index, self.state.num_processes
        self.device = self.state.device if self.world > 1 else torch.device(device)
        self.mixed_precision = mixed_precision
        self.scaler = torch.amp.GradScaler(self.device.type) if mixed_precision == "fp16" else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> slice:
        """The rows of a global batch of `count` that this process runs."""
        if count % self.world:
            raise ConfigError(f"batch_size: {count} is not divisible by the {self.world} processes")
        size = count // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    @staticmethod
    def parts(rows: int, accumulation: int) -> list[slice]:
        """`rows` (a process's share) in `accumulation` equal parts, one U-Net pass each (gradient accumulation)."""
        if rows % accumulation:
            raise ConfigError(
                f"gradient_accumulation_steps: {accumulation} does not divide this process's {rows} rows of the batch"
            )
        size = rows // accumulation
        return [slice(start, start + size) for start in range(0, rows, size)]

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        if self.mixed_precision == "no":
            yield
            return
        dtype = torch.float16 if self.mixed_precision == "fp16" else torch.bfloat16
        with torch.autocast(device_type=self.device.type, dtype=dtype):
            yield

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate (scaled under fp16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def step(
        self, optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], clip: float | None = None
    ) -> None:
        """Average the gradients over the processes, unscale them (fp16), clip their norm to `clip`, step (fp16: a
        step whose gradients overflowed is skipped and the scale lowered)."""
        self.average_gradients(parameters)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, clip)
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def average_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        from accelerate.utils import reduce

        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad = reduce(parameter.grad, reduction="mean")

    def wait(self) -> None:
        self.state.wait_for_everyone()
