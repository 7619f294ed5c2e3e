"""Model surgery shared by training and serving: the architecture space of a `UNet2DConditionModel`, gated
forward, the exact MAC model, physical slicing, and expert files."""

from .expert import ExpertFileError, ExpertInfo, load_expert, save_expert
from .gates import UNetGates, apply_gates
from .macs import MacTable, flop_counter_macs
from .slicing import slice_unet
from .space import ArchitectureSpace, PrunableUnit, UnitKind

__all__ = [
    "ArchitectureSpace",
    "ExpertFileError",
    "ExpertInfo",
    "MacTable",
    "PrunableUnit",
    "UNetGates",
    "UnitKind",
    "apply_gates",
    "flop_counter_macs",
    "load_expert",
    "save_expert",
    "slice_unet",
]
