"""Exact MAC model of a U-Net sub-network, and a cross-check against PyTorch's FLOP counter.

The MAC table is measured, not derived by hand: a twin of the full U-Net is built on the `meta` device (no memory,
no compute) and run once at batch 1 with hooks that record every convolution, linear layer and attention matmul.
Each figure is then attributed to the unit that owns it; everything no gate can remove is `fixed`. Because every
counted op scales linearly with the channels or heads a gate keeps, a sub-network costs

    fixed + sum_depth(gate * own MACs) + sum_width(kept fraction * unit MACs * parent depth gate).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .space import ArchitectureSpace


@dataclass
class MacTable:
    """Per-unit MACs of one U-Net call at batch 1 and one resolution.

    Parameters:
        resolution (`tuple[int, int]`): the U-Net's input height and width.
        fixed (`int`): MACs no gate removes (conv_in/out, time embedding, samplers, transformer projections
            outside a depth unit, ...).
        total (`int`): MACs of the full U-Net.
        gate_macs (`torch.Tensor`): `(width_dim,)` MACs one width gate removes (unit MACs / gates in the unit).
        parent_index (`torch.Tensor`): `(width_dim,)` position in the architecture vector of the depth gate that
            contains the gate, or -1.
        depth_macs (`torch.Tensor`): `(depth_dim,)` MACs of a depth unit's module that no width gate owns.
        unit_macs (`dict[str, int]`): MACs of every unit at full width (for reports).
        op_macs (`dict[str, int]`): MACs of the full U-Net by kind of op (`conv`, `linear`, `attention_matmul`).
    """

    resolution: tuple[int, int]
    fixed: int
    total: int
    gate_macs: torch.Tensor
    parent_index: torch.Tensor
    depth_macs: torch.Tensor
    unit_macs: dict[str, int]
    op_macs: dict[str, int]

    def cost(self, arch: torch.Tensor) -> torch.Tensor:
        """`(..., dim)` gates -> `(...,)` MACs, differentiable in the gates."""
        width_dim = self.gate_macs.numel()
        gate_macs = self.gate_macs.to(arch.device, arch.dtype)
        depth_macs = self.depth_macs.to(arch.device, arch.dtype)
        parent_index = self.parent_index.to(arch.device)
        width, depth = arch[..., :width_dim], arch[..., width_dim:]
        parent = arch[..., parent_index.clamp(min=0)]  # (..., width_dim)
        parent = torch.where(parent_index >= 0, parent, torch.ones_like(parent))
        return self.fixed + (width * parent * gate_macs).sum(-1) + (depth * depth_macs).sum(-1)


def _build_meta_twin(unet_config: dict) -> nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(unet_config)


def _dummy_inputs(unet: nn.Module, resolution: tuple[int, int], text_len: int, device, dtype):
    config = unet.config
    cross_dim = config.cross_attention_dim
    if isinstance(cross_dim, list | tuple):
        cross_dim = cross_dim[0]
    sample = torch.zeros(1, config.in_channels, *resolution, device=device, dtype=dtype)
    timestep = torch.tensor([1], device=device)
    context = torch.zeros(1, text_len, cross_dim, device=device, dtype=dtype)
    return sample, timestep, context


def _leaf_macs(module: nn.Module, output: torch.Tensor) -> int:
    per_sample_out = output.numel() // output.shape[0]
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_sample_out * (module.in_channels // module.groups) * kh * kw
    return per_sample_out * module.in_features  # nn.Linear


def gated_paths(unit, unet: nn.Module) -> list[str]:
    """Paths of the modules whose MACs scale with a width unit's kept gates."""
    from .space import UnitKind, feed_forward_layers

    if unit.kind is UnitKind.RESNET:
        return [f"{unit.module}.{name}" for name in ("conv1", "time_emb_proj", "conv2")]
    if unit.kind in (UnitKind.SELF_ATTENTION, UnitKind.CROSS_ATTENTION):
        # The Attention module itself is charged with the QK^T and AV matmuls.
        return [unit.module] + [f"{unit.module}.{name}" for name in ("to_q", "to_k", "to_v", "to_out.0")]
    if unit.kind is UnitKind.FEED_FORWARD:
        return [f"{unit.module}.{name}" for name in feed_forward_layers(unet.get_submodule(unit.module))]
    raise ValueError(f"{unit.name} is not a width unit")


def trace_mac_table(space: ArchitectureSpace, resolution: tuple[int, int]) -> MacTable:
    """Measure the per-unit MACs of `space`'s full U-Net at `resolution` (batch 1, key length `space.text_len`)."""
    from diffusers.models.attention_processor import Attention

    twin = _build_meta_twin(space.unet_config)
    owner = {path: unit.name for unit in space.width_units for path in gated_paths(unit, twin)}
    depth_prefixes = [(u.module, u.name) for u in space.depth_units]

    per_owner: dict[str | None, int] = {}
    per_op = {"conv": 0, "linear": 0, "attention_matmul": 0}

    def charge(path: str, macs: int, op: str) -> None:
        per_op[op] += macs
        name = owner.get(path)
        if name is None:
            name = next((n for prefix, n in depth_prefixes if path.startswith(prefix + ".")), None)
        per_owner[name] = per_owner.get(name, 0) + macs

    def leaf_hook(path):
        def hook(module, args, output):
            charge(path, _leaf_macs(module, output), "conv" if isinstance(module, nn.Conv2d) else "linear")

        return hook

    def attention_hook(path):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            query_len = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
            key_len = query_len if context is None else context.shape[1]
            # QK^T and AV, each query_len x key_len x inner_dim.
            charge(path, 2 * query_len * key_len * module.inner_dim, "attention_matmul")

        return hook

    handles = []
    for path, module in twin.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            handles.append(module.register_forward_hook(leaf_hook(path)))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_pre_hook(attention_hook(path), with_kwargs=True))
    try:
        with torch.no_grad():
            twin(*_dummy_inputs(twin, resolution, space.text_len, "meta", torch.float32))
    finally:
        for handle in handles:
            handle.remove()

    unit_macs = {u.name: per_owner.get(u.name, 0) for u in space.units}
    gate_macs = []
    for unit in space.width_units:
        gate_macs += [unit_macs[unit.name] / unit.num_gates] * unit.num_gates
    # A depth unit removes its own MACs plus those of the width units inside it (through parent_index).
    full_depth_macs = dict(unit_macs)
    for unit in space.width_units:
        if unit.depth_parent:
            full_depth_macs[unit.depth_parent] += unit_macs[unit.name]
    unit_macs = {**unit_macs, **{u.name: full_depth_macs[u.name] for u in space.depth_units}}
    return MacTable(
        resolution=resolution,
        fixed=per_owner.get(None, 0),
        total=sum(per_owner.values()),
        gate_macs=torch.tensor(gate_macs, dtype=torch.float64),
        parent_index=space.parent_index(),
        depth_macs=torch.tensor([per_owner.get(u.name, 0) for u in space.depth_units], dtype=torch.float64),
        unit_macs=unit_macs,
        op_macs=per_op,
    )


def flop_counter_macs(unet: nn.Module, resolution: int | tuple[int, int], text_len: int) -> int:
    """MACs of one batch-1 call as PyTorch's `FlopCounterMode` sees them (FLOPs / 2), for cross-checking.

    Runs on the U-Net's own device (a `meta` U-Net costs nothing). Attention runs through the classic bmm
    processor for the duration, because the fused CPU attention kernel is invisible to the counter.
    """
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    parameter = next(unet.parameters())
    saved = unet.attn_processors
    unet.set_attn_processor(AttnProcessor())
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(*_dummy_inputs(unet, resolution, text_len, parameter.device, parameter.dtype))
    finally:
        unet.set_attn_processor(saved)
    return counter.get_total_flops() // 2


def meta_flop_macs(module: nn.Module, call: Callable[[nn.Module], object]) -> int:
    """MACs (FLOPs / 2) that PyTorch's `FlopCounterMode` counts while `call(twin)` runs on a `meta` copy of
    `module` (built from its config, so nothing is allocated). On `meta` tensors the fused attention kernel is
    counted too. For models outside the prunable U-Net (a VAE decoder, a text encoder), whose cost is reported but
    never gated."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        twin = (
            type(module)(module.config)
            if not hasattr(module, "from_config")
            else type(module).from_config(module.config)
        )
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call(twin)
    return counter.get_total_flops() // 2
