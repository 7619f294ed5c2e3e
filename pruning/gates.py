"""Gated forward: run a full U-Net as any sub-network of its architecture space, one gate vector per sample.

Gates are applied by hooks, so the diffusers modules run unchanged, with any attention processor:
- ResNet width: on the input of `conv2` (after `norm2`, the activation and dropout), per GroupNorm group;
- attention heads: on the input of `to_out[0]`, per head;
- feed-forward: on the input of the output Linear (`value * gelu(gate)` for GEGLU), per group;
- depth: the module's output becomes `d * output + (1 - d) * pass_through(input)`.
With hard gates this computes exactly what the physically sliced model computes (see `pruning.slicing`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .space import ArchitectureSpace, PrunableUnit, UnitKind, feed_forward_layers


def _per_sample(gates: torch.Tensor, batch: int) -> torch.Tensor:
    """Expand `(B, n)` gates to a module batch of `batch` rows: B == batch, B == 1, or batch == k * B (the layout
    of `torch.cat([x] * k)`, e.g. classifier-free guidance's unconditional and conditional halves)."""
    rows = gates.shape[0]
    if rows == batch or rows == 1:
        return gates
    if batch % rows == 0:
        return gates.repeat(batch // rows, 1)
    raise ValueError(f"gates for {rows} samples cannot be applied to a batch of {batch}")


def _channel_mask(gates: torch.Tensor, unit: PrunableUnit, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    mask = _per_sample(gates, x.shape[0]).repeat_interleave(unit.channels_per_gate, dim=1).to(x.dtype)  # (N, C)
    shape = [mask.shape[0]] + [1] * (x.ndim - 1)
    shape[channel_dim] = mask.shape[1]
    return mask.view(shape)


class UNetGates:
    """Hooks that gate a `UNet2DConditionModel` by an architecture vector per sample.

    Attach once and change `gates` between calls (training), or use [`apply_gates`] for one block of code.
    `gates = None` leaves the model unchanged (the teacher pass of distillation).

    Parameters:
        unet (`UNet2DConditionModel`): the full model `space` was read from.
        space (`ArchitectureSpace`): its architecture space.
    """

    def __init__(self, unet: nn.Module, space: ArchitectureSpace):
        self.unet = unet
        self.space = space
        self.gates: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def set(self, gates: torch.Tensor | None) -> None:
        """`(dim,)` or `(B, dim)` gates, soft or hard, or None for the full model."""
        if gates is not None:
            gates = self.space.check(gates)
            gates = gates.unsqueeze(0) if gates.ndim == 1 else gates
        self.gates = gates

    def attach(self) -> UNetGates:
        if self._handles:
            return self
        for unit in self.space.units:
            module = self.unet.get_submodule(unit.module)
            if unit.kind is UnitKind.RESNET:
                hook, target, depth = self._input_gate(unit, channel_dim=1), module.conv2, False
            elif unit.kind in (UnitKind.SELF_ATTENTION, UnitKind.CROSS_ATTENTION):
                hook, target, depth = self._input_gate(unit, channel_dim=-1), module.to_out[0], False
            elif unit.kind is UnitKind.FEED_FORWARD:
                target = module.get_submodule(feed_forward_layers(module)[1])
                hook, depth = self._input_gate(unit, channel_dim=-1), False
            else:
                hook, target, depth = self._depth_gate(unit, module), module, True
            if depth:
                self._handles.append(target.register_forward_hook(hook, with_kwargs=True))
            else:
                self._handles.append(target.register_forward_pre_hook(hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _input_gate(self, unit: PrunableUnit, channel_dim: int):
        sl = self.space.slices[unit.name]

        def hook(module, args):
            if self.gates is None:
                return None
            x = args[0]
            return (x * _channel_mask(self.gates[:, sl], unit, x, channel_dim),) + tuple(args[1:])

        return hook

    def _depth_gate(self, unit: PrunableUnit, module: nn.Module):
        index = self.space.slices[unit.name].start
        resnet = unit.kind is UnitKind.RESNET_DEPTH
        out_channels = module.out_channels if resnet else None

        def hook(module, args, kwargs, output):
            if self.gates is None:
                return None
            if resnet:
                x = args[0] if args else kwargs["input_tensor"]
                passed, y = x[:, :out_channels], output
            else:
                passed = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output.sample
            d = _per_sample(self.gates[:, index : index + 1], y.shape[0]).to(y.dtype).view(-1, 1, 1, 1)  # (N,1,1,1)
            mixed = d * y + (1 - d) * passed
            if resnet:
                return mixed
            if isinstance(output, tuple):
                return (mixed,) + tuple(output[1:])
            output.sample = mixed
            return output

        return hook


@contextmanager
def apply_gates(unet: nn.Module, space: ArchitectureSpace, gates: torch.Tensor | None) -> Iterator[UNetGates]:
    """Run `unet` as the sub-network(s) `gates` inside the block: `(dim,)` for all samples or `(B, dim)`."""
    controller = UNetGates(unet, space)
    controller.set(gates)
    controller.attach()
    try:
        yield controller
    finally:
        controller.detach()
