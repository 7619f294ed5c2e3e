"""Model surgery: the architecture space of a `UNet2DConditionModel`, gated forward, the exact MAC model, physical
slicing and importance scores. Files on disk (experts, bundles) are `aptp.formats`."""

from .gates import UNetGates, apply_gates
from .macs import MacTable, flop_counter_macs
from .slicing import slice_unet
from .space import ArchitectureSpace, PrunableUnit, UnitKind

__all__ = [
    "ArchitectureSpace",
    "MacTable",
    "PrunableUnit",
    "UNetGates",
    "UnitKind",
    "apply_gates",
    "flop_counter_macs",
    "slice_unet",
]
