"""What phase 1 and phase 2 share: the student's losses against the frozen teacher (denoising, output and
feature distillation) and the batch of noisy inputs they are computed on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from aptp.conditioning.prompts import Conditioning
from aptp.sampling import denoise

from .noise import NoisyBatch


def _block_output(output) -> torch.Tensor:
    # Down blocks return (hidden_states, residuals); mid and up blocks return hidden_states.
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def block_features(unet: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the outputs of every down block, the mid block and every up block of `unet` while inside."""
    features: list[torch.Tensor] = []
    blocks = [*unet.down_blocks, unet.mid_block, *unet.up_blocks]
    handles = [b.register_forward_hook(lambda m, a, out: features.append(_block_output(out))) for b in blocks]
    try:
        yield features
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class DistillLosses:
    denoise: torch.Tensor
    output: torch.Tensor
    features: torch.Tensor

    def weighted(self, denoise: float, output: float, features: float) -> torch.Tensor:
        return denoise * self.denoise + output * self.output + features * self.features

    @staticmethod
    def mean(parts: list[DistillLosses]) -> DistillLosses:
        """The losses of a batch run in equal parts (for logging: no gradient)."""
        stack = {
            k: torch.stack([getattr(p, k).detach() for p in parts]).mean() for k in ("denoise", "output", "features")
        }
        return DistillLosses(**stack)


def student_losses(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: NoisyBatch,
    prompts: Conditioning,
    teacher_out: torch.Tensor | None = None,
    teacher_features: list[torch.Tensor] | None = None,
) -> DistillLosses:
    """Denoising loss (min-SNR weighted) plus output and block-feature MSE against the teacher, both U-Nets reading
    `prompts` (token states, mask and, for U-Nets that take one, the prompt map). Pass `teacher` to run it here
    (under no_grad), or its precomputed `teacher_out` / `teacher_features`. Each U-Net reads its inputs in its own
    dtype (a frozen teacher may be held in half precision beside a float32 student)."""
    if teacher is not None:
        dtype = next(teacher.parameters()).dtype
        with torch.no_grad(), block_features(teacher) as features:
            noisy, cond = batch.noisy.to(dtype), prompts.to(dtype=dtype)
            teacher_out = denoise(teacher, noisy, batch.timesteps, cond).sample
        teacher_features = [f.detach() for f in features]
    dtype = next(student.parameters()).dtype
    with block_features(student) as student_features:
        out = denoise(student, batch.noisy.to(dtype), batch.timesteps, prompts.to(dtype=dtype)).sample
    per_sample = F.mse_loss(out.float(), batch.target.float(), reduction="none").mean(dim=(1, 2, 3))
    denoising = (batch.weight * per_sample).mean()
    output = F.mse_loss(out.float(), teacher_out.float())
    pairs = zip(student_features, teacher_features, strict=True)
    features = torch.stack([F.mse_loss(s.float(), t.float()) for s, t in pairs]).mean()
    return DistillLosses(denoise=denoising, output=output, features=features)
