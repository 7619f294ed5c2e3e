"""Physical slicing: turn one architecture into a smaller, dense `UNet2DConditionModel`.

The per-block functions below take a module and the indices to keep and shrink that module in place; they know
nothing about policy. [`slice_unet`] copies the teacher and applies them for one architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
from diffusers.models.transformers.transformer_2d import Transformer2DModelOutput
from torch import nn

from .space import ArchitectureSpace, UnitKind, feed_forward_layers


def group_channels(groups: Sequence[int], channels_per_group: int, device="cpu") -> torch.Tensor:
    """Channel indices of the kept groups: `[g * size, ..., g * size + size - 1]` for each `g`."""
    groups_t = torch.as_tensor(list(groups), dtype=torch.long)
    offsets = torch.arange(channels_per_group)
    return (groups_t[:, None] * channels_per_group + offsets[None, :]).flatten().to(device)


def _parameter(tensor: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone(), requires_grad=like.requires_grad)


def select_linear(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear holding the given output rows and input columns of `linear`."""
    weight = linear.weight
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    with torch.device("meta"):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=linear.bias is not None)
    new.weight = _parameter(weight, linear.weight)
    if linear.bias is not None:
        bias = linear.bias if rows is None else linear.bias.index_select(0, rows)
        new.bias = _parameter(bias, linear.bias)
    return new


def select_conv2d(conv: nn.Conv2d, out_channels: torch.Tensor | None = None, in_channels: torch.Tensor | None = None):
    """A new Conv2d holding the given output and input channels of `conv` (groups must be 1)."""
    if conv.groups != 1:
        raise ValueError("grouped convolutions are not sliced")
    weight = conv.weight  # (out, in, kh, kw)
    if out_channels is not None:
        weight = weight.index_select(0, out_channels)
    if in_channels is not None:
        weight = weight.index_select(1, in_channels)
    with torch.device("meta"):
        new = nn.Conv2d(
            weight.shape[1],
            weight.shape[0],
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
    new.weight = _parameter(weight, conv.weight)
    if conv.bias is not None:
        bias = conv.bias if out_channels is None else conv.bias.index_select(0, out_channels)
        new.bias = _parameter(bias, conv.bias)
    return new


def slice_resnet_width(resnet: nn.Module, keep_groups: Sequence[int]) -> None:
    """Keep whole GroupNorm groups of a `ResnetBlock2D`'s inner width: `conv1` and `time_emb_proj` outputs,
    `norm2` (fewer groups of the same size, so the kept groups' statistics do not change), `conv2` inputs."""
    norm = resnet.norm2
    size = norm.num_channels // norm.num_groups
    idx = group_channels(keep_groups, size, norm.weight.device if norm.affine else resnet.conv1.weight.device)
    resnet.conv1 = select_conv2d(resnet.conv1, out_channels=idx)
    if resnet.time_emb_proj is not None:
        rows = idx
        if resnet.time_embedding_norm == "scale_shift":  # (scale, shift) halves
            rows = torch.cat([idx, idx + norm.num_channels])
        resnet.time_emb_proj = select_linear(resnet.time_emb_proj, rows=rows)
    with torch.device("meta"):
        new_norm = nn.GroupNorm(len(keep_groups), len(keep_groups) * size, eps=norm.eps, affine=norm.affine)
    if norm.affine:
        new_norm.weight = _parameter(norm.weight.index_select(0, idx), norm.weight)
        new_norm.bias = _parameter(norm.bias.index_select(0, idx), norm.bias)
    resnet.norm2 = new_norm
    resnet.conv2 = select_conv2d(resnet.conv2, in_channels=idx)


def slice_attention_heads(attn: nn.Module, keep_heads: Sequence[int]) -> None:
    """Keep whole heads of a diffusers `Attention`: rows of `to_q/to_k/to_v`, columns of `to_out[0]`."""
    head_dim = attn.inner_dim // attn.heads
    idx = group_channels(keep_heads, head_dim, attn.to_q.weight.device)
    attn.to_q = select_linear(attn.to_q, rows=idx)
    attn.to_k = select_linear(attn.to_k, rows=idx)
    attn.to_v = select_linear(attn.to_v, rows=idx)
    attn.to_out[0] = select_linear(attn.to_out[0], cols=idx)
    attn.heads = len(keep_heads)
    attn.sliceable_head_dim = len(keep_heads)
    attn.inner_dim = attn.inner_kv_dim = len(keep_heads) * head_dim


def slice_feed_forward(ff: nn.Module, keep_groups: Sequence[int], channels_per_group: int) -> None:
    """Keep groups of a `FeedForward`'s inner width: the matching rows of both GEGLU halves (value and gate) or
    of the single projection, and the matching columns of the output Linear."""
    proj_path, out_path = feed_forward_layers(ff)
    activation = ff.net[0]
    out = ff.get_submodule(out_path)
    inner = out.in_features
    idx = group_channels(keep_groups, channels_per_group, out.weight.device)
    rows = torch.cat([idx, idx + inner]) if activation.proj.out_features == 2 * inner else idx
    activation.proj = select_linear(activation.proj, rows=rows)
    ff.set_submodule(out_path, select_linear(out, cols=idx))


class ResnetPassThrough(nn.Module):
    """Stands in for a dropped `ResnetBlock2D`: returns the first `out_channels` input channels (in an up block,
    the main path; the concatenated skip input is dropped)."""

    def __init__(self, out_channels: int):
        super().__init__()
        self.out_channels = out_channels

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        return input_tensor[:, : self.out_channels]


class TransformerPassThrough(nn.Module):
    """Stands in for a dropped `Transformer2DModel` (which is residual, so dropping it is the identity)."""

    def forward(self, hidden_states: torch.Tensor, *args, return_dict: bool = True, **kwargs):
        return Transformer2DModelOutput(sample=hidden_states) if return_dict else (hidden_states,)


def apply_keep_sets(unet: nn.Module, space: ArchitectureSpace, keep_sets: Mapping[str, Sequence[int]]) -> nn.Module:
    """Shrink `unet` (a full U-Net of `space`) in place to the architecture described by `keep_sets`."""
    dropped = {u.name for u in space.depth_units if not keep_sets[u.name]}
    for unit in space.width_units:
        if unit.depth_parent in dropped:
            continue
        keep = list(keep_sets[unit.name])
        if not keep:
            raise ValueError(f"{unit.name} would lose all its gates")
        if len(keep) == unit.num_gates:
            continue
        module = unet.get_submodule(unit.module)
        if unit.kind is UnitKind.RESNET:
            slice_resnet_width(module, keep)
        elif unit.kind is UnitKind.FEED_FORWARD:
            slice_feed_forward(module, keep, unit.channels_per_gate)
        else:
            slice_attention_heads(module, keep)
    for unit in space.depth_units:
        if unit.name in dropped:
            if unit.kind is UnitKind.RESNET_DEPTH:
                replacement = ResnetPassThrough(unet.get_submodule(unit.module).out_channels)
            else:
                replacement = TransformerPassThrough()
            unet.set_submodule(unit.module, replacement)
    return unet


def slice_unet(unet: nn.Module, space: ArchitectureSpace, arch: torch.Tensor) -> nn.Module:
    """A new, smaller `UNet2DConditionModel` computing what `unet` gated by the hard `arch` computes.
    `unet` is left untouched; `arch` is hardened at 0.5 with the non-empty guard."""
    return apply_keep_sets(copy.deepcopy(unet), space, space.keep_sets(arch))
