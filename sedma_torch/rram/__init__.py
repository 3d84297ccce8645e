"""Layer 1: simulated RRAM crossbars (materials, programming, tiles, correction, layers)."""

from .config import CORRECTIONS, DENOISERS, PRESETS, RRAMConfig, preset
from .convert import RRAMConv1D, RRAMSummary, convert_, summary
from .correction import denoise, estimate_lambda, gcv_lambda
from .crossbar import CrossbarStats
from .layers import RRAMConv2d, RRAMLinear, to_digital
from .materials import Material, get_material, list_materials, register_material
from .mvm import MVMResult, mvm
from .partition import Tiling, crossbar_utilisation
from .programming import ProgrammingStats, program_conductances

__all__ = [
    "CORRECTIONS",
    "DENOISERS",
    "PRESETS",
    "CrossbarStats",
    "MVMResult",
    "Material",
    "ProgrammingStats",
    "RRAMConfig",
    "RRAMConv1D",
    "RRAMConv2d",
    "RRAMLinear",
    "RRAMSummary",
    "Tiling",
    "convert_",
    "crossbar_utilisation",
    "denoise",
    "estimate_lambda",
    "gcv_lambda",
    "get_material",
    "list_materials",
    "mvm",
    "preset",
    "program_conductances",
    "register_material",
    "summary",
    "to_digital",
]
