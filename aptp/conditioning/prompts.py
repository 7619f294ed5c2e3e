"""The conditioning object: everything a batch of prompts hands to a U-Net (and to the router), row by row."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

Rows = int | slice | Sequence[int] | torch.Tensor


@dataclass(frozen=True)
class Conditioning:
    """A batch of prompts as the models read them: row `i` of every tensor belongs to prompt `i`.

    It travels as one object from the encoder to the U-Net: the engine selects, repeats and concatenates rows of it
    to form batches, and `aptp.sampling.denoise` unpacks it at the U-Net call.

    Parameters:
        states (`torch.Tensor`): `(B, L, D)` token states, what the U-Net's cross-attention reads.
        mask (`torch.Tensor`, *optional*): `(B, L)`, 1 for a real token, 0 for padding; None: every token is real.
        pooled (`torch.Tensor`, *optional*): `(B, E)` the sentence embedding the router reads.
        prompt_map (`torch.Tensor`, *optional*): `(B, C, g, g)` the text adapter's prompt map, for U-Nets that take
            one as input channels.
    """

    states: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    prompt_map: torch.Tensor | None = None

    def __post_init__(self):
        batch = self.states.shape[0]
        for name, tensor in self._tensors().items():
            if tensor is not None and tensor.shape[0] != batch:
                raise ValueError(f"conditioning: {name} has {tensor.shape[0]} rows, states {batch}")

    def __len__(self) -> int:
        return self.states.shape[0]

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def _map(self, fn: Callable[[str, torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning(**{k: None if t is None else fn(k, t) for k, t in self._tensors().items()})

    def select(self, rows: Rows) -> Conditioning:
        """The given rows (an index, a slice, or a list or tensor of indices), in that order."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        elif not isinstance(rows, slice):
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.states.device)
        return self._map(lambda _, t: t[rows])

    def repeat(self, n: int) -> Conditioning:
        """Every row `n` times in a row (`[a, b]` -> `[a, a, b, b]` for 2): one row per image of each prompt."""
        if n < 1:
            raise ValueError(f"conditioning: repeat count must be positive, got {n}")
        return self if n == 1 else self._map(lambda _, t: t.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        """The rows of `items`, one after another. A field is kept when every item has it; one that only some items
        have is an error (a batch whose rows disagree on what conditions them)."""
        if not items:
            raise ValueError("conditioning: nothing to concatenate")
        if len(items) == 1:
            return items[0]
        merged: dict[str, torch.Tensor | None] = {}
        for f in fields(Conditioning):
            parts = [getattr(item, f.name) for item in items]
            present = [p is not None for p in parts]
            if any(present) and not all(present):
                raise ValueError(f"conditioning: {f.name} is set on some rows and not on others")
            merged[f.name] = torch.cat(parts) if all(present) else None
        return Conditioning(**merged)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """On `device`, floating tensors cast to `dtype` (the mask keeps its integer type)."""
        return self._map(lambda _, t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    def for_unet(self) -> Conditioning:
        """The fields a U-Net reads: the router's pooled embedding dropped (prompts routed by different encoders, or
        not routed at all, such as the empty prompt of a one-code model, then batch together)."""
        return self if self.pooled is None else replace(self, pooled=None)

    def with_states(self, states: torch.Tensor, mask: torch.Tensor | None, prompt_map: torch.Tensor | None):
        """The same prompts read through another text model (e.g. the teacher's text adapter): new states, mask and
        prompt map, the same pooled embedding."""
        return replace(self, states=states, mask=mask, prompt_map=prompt_map)
