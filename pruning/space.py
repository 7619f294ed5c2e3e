"""The architecture space of a diffusers `UNet2DConditionModel`: which units can be pruned and how a
sub-network is written down as one flat vector of gates.

The vector holds all width gates first (ResNet GroupNorm groups, self-attention heads, cross-attention heads,
feed-forward groups, in module order) and then one depth gate per droppable module (the last ResNet and the last
Transformer2D of each down/up block, where the shapes allow a pass-through).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import torch
from torch import nn

DEFAULT_FEED_FORWARD_GROUPS = 32
DEFAULT_TEXT_LEN = 77


class UnitKind(StrEnum):
    RESNET = "resnet"
    SELF_ATTENTION = "attn1"
    CROSS_ATTENTION = "attn2"
    FEED_FORWARD = "ff"
    RESNET_DEPTH = "resnet_depth"
    TRANSFORMER_DEPTH = "transformer_depth"

    @property
    def is_depth(self) -> bool:
        return self in (UnitKind.RESNET_DEPTH, UnitKind.TRANSFORMER_DEPTH)


@dataclass(frozen=True)
class PrunableUnit:
    """One prunable unit of the U-Net.

    Parameters:
        kind (`UnitKind`): what is gated.
        module (`str`): dotted path of the module in the U-Net (the ResNet, the `Attention`, the `FeedForward`, or
            the module a depth gate replaces).
        num_gates (`int`): gates in this unit (groups, heads; 1 for a depth unit).
        channels_per_gate (`int`): channels one gate keeps or drops (GroupNorm group size, head dimension,
            feed-forward group width; 0 for a depth unit).
        depth_parent (`str`, *optional*): name of the depth unit whose module contains this unit, if any.
    """

    kind: UnitKind
    module: str
    num_gates: int
    channels_per_gate: int
    depth_parent: str | None = None

    @property
    def name(self) -> str:
        return f"{self.kind.value}:{self.module}"

    @property
    def block(self) -> str:
        """The top-level block the unit sits in (`down_blocks.1`, `mid_block`, `up_blocks.0`)."""
        parts = self.module.split(".")
        return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def _largest_divisor_at_most(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def feed_forward_layers(ff: nn.Module) -> tuple[str, str]:
    """Relative paths of a diffusers `FeedForward`'s input projection (inside its activation: GEGLU, GELU, ...)
    and its output Linear."""
    outs = [f"net.{i}" for i, m in enumerate(ff.net) if isinstance(m, nn.Linear)]
    if len(outs) != 1 or not isinstance(getattr(ff.net[0], "proj", None), nn.Linear):
        raise ValueError("unsupported FeedForward layout: expected net[0].proj and one output Linear in `net`")
    return "net.0.proj", outs[0]


def _check_supported(config: Mapping[str, Any]) -> None:
    unsupported = {
        "addition_embed_type": config.get("addition_embed_type"),
        "class_embed_type": config.get("class_embed_type"),
        "encoder_hid_dim_type": config.get("encoder_hid_dim_type"),
    }
    set_fields = {k: v for k, v in unsupported.items() if v is not None}
    if set_fields:
        raise ValueError(f"unsupported UNet2DConditionModel config (extra conditioning): {set_fields}")


class ArchitectureSpace:
    """The prunable units of one U-Net and the layout of its architecture vector.

    Build it with [`ArchitectureSpace.from_unet`]; it only reads the module structure, so a U-Net on the `meta`
    device works. MAC figures come from [`pruning.macs`] and are cached per resolution.

    Parameters:
        units (`list[PrunableUnit]`): width units first, then depth units, in module order.
        unet_config (`dict`): the config of the full U-Net (used to rebuild it on the meta device for costing).
        text_len (`int`): cross-attention key length used by the cost model.
    """

    def __init__(self, units: list[PrunableUnit], unet_config: Mapping[str, Any], text_len: int = DEFAULT_TEXT_LEN):
        widths = [u for u in units if not u.kind.is_depth]
        depths = [u for u in units if u.kind.is_depth]
        if units != widths + depths:
            raise ValueError("width units must come before depth units")
        self.units: tuple[PrunableUnit, ...] = tuple(units)
        self.unet_config: dict[str, Any] = dict(unet_config)
        self.text_len = int(text_len)
        self.slices: dict[str, slice] = {}
        start = 0
        for unit in self.units:
            self.slices[unit.name] = slice(start, start + unit.num_gates)
            start += unit.num_gates
        self.dim = start
        self.width_dim = sum(u.num_gates for u in widths)
        self._by_name = {u.name: u for u in self.units}
        self._mac_tables: dict[tuple[int, int], Any] = {}

    # ----------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_unet(
        cls,
        unet: nn.Module,
        text_len: int = DEFAULT_TEXT_LEN,
        feed_forward_groups: int = DEFAULT_FEED_FORWARD_GROUPS,
    ) -> ArchitectureSpace:
        """Read the prunable units of a `UNet2DConditionModel` (full, not already sliced)."""
        from diffusers.models.attention import FeedForward
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel

        config = dict(unet.config)
        _check_supported(config)
        widths: list[PrunableUnit] = []
        depths: list[PrunableUnit] = []
        depth_modules = dict(_droppable_modules(unet))  # path -> kind

        def parent_depth(path: str) -> str | None:
            for module_path, kind in depth_modules.items():
                if path == module_path or path.startswith(module_path + "."):
                    return f"{kind.value}:{module_path}"
            return None

        for path, module in unet.named_modules():
            if isinstance(module, ResnetBlock2D):
                groups = module.norm2.num_groups
                channels = module.norm2.num_channels
                widths.append(PrunableUnit(UnitKind.RESNET, path, groups, channels // groups, parent_depth(path)))
            elif isinstance(module, Attention) and path.split(".")[-1] in ("attn1", "attn2"):
                if getattr(module, "inner_kv_dim", module.inner_dim) != module.inner_dim:
                    raise ValueError(f"{path}: grouped key/value heads are not supported")
                kind = UnitKind.SELF_ATTENTION if path.endswith("attn1") else UnitKind.CROSS_ATTENTION
                head_dim = module.inner_dim // module.heads
                widths.append(PrunableUnit(kind, path, module.heads, head_dim, parent_depth(path)))
            elif isinstance(module, FeedForward):
                inner = module.get_submodule(feed_forward_layers(module)[1]).in_features
                groups = _largest_divisor_at_most(inner, feed_forward_groups)
                widths.append(PrunableUnit(UnitKind.FEED_FORWARD, path, groups, inner // groups, parent_depth(path)))
            elif isinstance(module, Transformer2DModel) and not module.is_input_continuous:
                raise ValueError(f"{path}: only continuous-input Transformer2DModel is supported")
        for path, kind in depth_modules.items():
            depths.append(PrunableUnit(kind, path, 1, 0, None))
        return cls(widths + depths, config, text_len=text_len)

    # --------------------------------------------------------------------------------------------------- layout
    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self) -> Iterator[PrunableUnit]:
        return iter(self.units)

    def __getitem__(self, name: str) -> PrunableUnit:
        return self._by_name[name]

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for u in self.units:
            counts[u.kind.value] = counts.get(u.kind.value, 0) + 1
        return f"ArchitectureSpace(dim={self.dim}, units={counts}, text_len={self.text_len})"

    @property
    def width_units(self) -> tuple[PrunableUnit, ...]:
        return tuple(u for u in self.units if not u.kind.is_depth)

    @property
    def depth_units(self) -> tuple[PrunableUnit, ...]:
        return tuple(u for u in self.units if u.kind.is_depth)

    @property
    def default_resolution(self) -> int:
        size = self.unet_config.get("sample_size") or 64
        return int(size if isinstance(size, int) else size[0])

    def gates_of(self, arch: torch.Tensor, name: str) -> torch.Tensor:
        """The gates of one unit: `arch[..., slice]`."""
        return arch[..., self.slices[name]]

    def unit_index(self) -> torch.Tensor:
        """For every gate, the index of its unit in `self.units` (shape `(dim,)`)."""
        return torch.cat([torch.full((u.num_gates,), i, dtype=torch.long) for i, u in enumerate(self.units)])

    def parent_index(self) -> torch.Tensor:
        """For every width gate, the position of the depth gate whose module contains it, or -1 (`(width_dim,)`)."""
        index = []
        for unit in self.width_units:
            parent = self.slices[unit.depth_parent].start if unit.depth_parent else -1
            index += [parent] * unit.num_gates
        return torch.tensor(index, dtype=torch.long)

    def gate_weights(self) -> torch.Tensor:
        """1 / sqrt(gates in the unit) per gate, so that every unit weighs the same in a normalised vector."""
        return torch.cat([torch.full((u.num_gates,), 1.0 / math.sqrt(u.num_gates)) for u in self.units])

    # ------------------------------------------------------------------------------------------- architectures
    def full(self) -> torch.Tensor:
        """The unpruned architecture (all gates on), shape `(dim,)`."""
        return torch.ones(self.dim)

    def random(self, keep: float, seed: int = 0) -> torch.Tensor:
        """A random hard architecture: each gate kept with probability `keep` (non-empty guard applied)."""
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        generator = torch.Generator().manual_seed(seed)
        scores = torch.rand(self.dim, generator=generator)
        return self.harden(1.0 - scores, threshold=1.0 - keep)

    def harden(self, arch: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Binary architecture from scores or gates (`(dim,)` or `(B, dim)`): `1[arch >= threshold]`, with the
        non-empty guard: a width unit that would lose every gate keeps its highest-scoring one."""
        arch = self.check(arch).detach()
        hard = (arch >= threshold).to(torch.float32)
        for unit in self.width_units:
            sl = self.slices[unit.name]
            empty = hard[..., sl].sum(-1) == 0  # (...,)
            if empty.any():
                best = arch[..., sl].argmax(-1, keepdim=True)  # (..., 1)
                rescued = torch.zeros_like(hard[..., sl]).scatter_(-1, best, 1.0)
                hard[..., sl] = torch.where(empty.unsqueeze(-1), rescued, hard[..., sl])
        return hard

    def check(self, arch: torch.Tensor) -> torch.Tensor:
        if not isinstance(arch, torch.Tensor):
            arch = torch.as_tensor(arch, dtype=torch.float32)
        if arch.ndim not in (1, 2) or arch.shape[-1] != self.dim:
            raise ValueError(
                f"architecture must have shape (dim,) or (B, dim) with dim={self.dim}, got {tuple(arch.shape)}"
            )
        return arch

    def keep_sets(self, arch: torch.Tensor) -> dict[str, list[int]]:
        """Kept gate indices per unit of one hard architecture (depth units: `[0]` kept, `[]` dropped)."""
        hard = self.harden(arch)
        if hard.ndim != 1:
            raise ValueError("keep_sets takes one architecture, not a batch")
        return {u.name: torch.nonzero(hard[self.slices[u.name]]).flatten().tolist() for u in self.units}

    def from_keep_sets(self, keep_sets: Mapping[str, list[int]]) -> torch.Tensor:
        """Inverse of [`keep_sets`]; every unit must be present."""
        missing = [u.name for u in self.units if u.name not in keep_sets]
        unknown = [n for n in keep_sets if n not in self._by_name]
        if missing or unknown:
            raise ValueError(f"keep-sets do not match this space: missing {missing[:3]}, unknown {unknown[:3]}")
        arch = torch.zeros(self.dim)
        for unit in self.units:
            indices = list(keep_sets[unit.name])
            if any(not 0 <= i < unit.num_gates for i in indices):
                raise ValueError(f"keep-set of {unit.name} has indices outside [0, {unit.num_gates})")
            if not unit.kind.is_depth and not indices:
                raise ValueError(f"keep-set of {unit.name} is empty (every width unit keeps at least one gate)")
            arch[self.slices[unit.name].start + torch.tensor(indices, dtype=torch.long)] = 1.0
        return arch

    # ---------------------------------------------------------------------------------------------------- costs
    def mac_table(self, resolution: int | tuple[int, int] | None = None):
        from .macs import trace_mac_table

        key = _resolution_key(resolution if resolution is not None else self.default_resolution)
        if key not in self._mac_tables:
            self._mac_tables[key] = trace_mac_table(self, key)
        return self._mac_tables[key]

    def total_macs(self, resolution: int | tuple[int, int] | None = None) -> int:
        """MACs of one call of the full U-Net at batch 1."""
        return self.mac_table(resolution).total

    def prunable_macs(self, resolution: int | tuple[int, int] | None = None) -> int:
        """The part of [`total_macs`] that some gate can remove."""
        table = self.mac_table(resolution)
        return table.total - table.fixed

    def macs(self, arch: torch.Tensor, resolution: int | tuple[int, int] | None = None) -> int:
        """Exact MACs of one call of the sub-network `arch` (hardened, guard applied) at batch 1."""
        hard = self.harden(arch)
        if hard.ndim != 1:
            raise ValueError("macs takes one architecture; use differentiable_macs for a batch")
        return round(float(self.mac_table(resolution).cost(hard.double())))

    def differentiable_macs(self, gates: torch.Tensor, resolution: int | tuple[int, int] | None = None) -> torch.Tensor:
        """MACs as a differentiable function of the gates, `(dim,)` -> `()` or `(B, dim)` -> `(B,)`.

        Exact for hard gates; pass straight-through hard gates during training so the figure stays exact while
        gradients flow to the soft ones.
        """
        return self.mac_table(resolution).cost(self.check(gates))

    def prunable_ratio(self, gates: torch.Tensor, resolution: int | tuple[int, int] | None = None) -> torch.Tensor:
        """The share of the prunable MACs kept (differentiable), `(dim,)` -> `()` or `(B, dim)` -> `(B,)`: what the
        search's budgets are held to, and the cost scale the router's capacity term weighs codes by."""
        table = self.mac_table(resolution)
        return (self.differentiable_macs(gates.double(), resolution) - table.fixed) / (table.total - table.fixed)

    # ------------------------------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        return {
            "text_len": self.text_len,
            "unet_config": _jsonable(self.unet_config),
            "units": [{**asdict(u), "kind": u.kind.value} for u in self.units],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ArchitectureSpace:
        units = [PrunableUnit(**{**u, "kind": UnitKind(u["kind"])}) for u in data["units"]]
        return cls(units, data["unet_config"], text_len=data["text_len"])


def _droppable_modules(unet: nn.Module) -> Iterator[tuple[str, UnitKind]]:
    """Depth units: the last ResNet and the last Transformer2D of every down/up block, where a pass-through keeps
    the shapes (a down-block ResNet must keep its channel count; an up-block ResNet passes its non-skip input)."""
    for group in ("down_blocks", "up_blocks"):
        for i, block in enumerate(getattr(unet, group)):
            resnets = getattr(block, "resnets", None)
            if resnets is not None and len(resnets) > 0:
                last = len(resnets) - 1
                resnet = resnets[last]
                if group == "down_blocks":
                    droppable = resnet.in_channels == resnet.out_channels and resnet.conv_shortcut is None
                else:  # the non-skip input of an up-block ResNet after the first is the previous ResNet's output
                    droppable = last >= 1
                if droppable:
                    yield f"{group}.{i}.resnets.{last}", UnitKind.RESNET_DEPTH
            attentions = getattr(block, "attentions", None)
            if attentions is not None and len(attentions) > 0:
                yield f"{group}.{i}.attentions.{len(attentions) - 1}", UnitKind.TRANSFORMER_DEPTH


def _resolution_key(resolution: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(resolution, int):
        return (resolution, resolution)
    height, width = resolution
    return (int(height), int(width))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
