"""Layer 1: simulated RRAM crossbars (materials, programming, tiles, correction, layers)."""

from .attention import RRAMMultiheadAttention
from .config import CORRECTIONS, DENOISERS, PRESETS, RRAMConfig, preset
from .conv import RRAMConv1d, RRAMConv2d
from .convert import ConversionReport, RRAMConv1D, RRAMSummary, conversion_report, convert_, summary
from .correction import denoise, estimate_lambda, gcv_lambda, lambda_errors
from .crossbar import CrossbarStats
from .hwa import hwa_noise, hwa_noise_
from .layers import to_digital
from .linear import RRAMLinear
from .materials import Material, get_material, list_materials, register_material
from .mvm import MVMResult, mvm
from .partition import (
    CrossbarPool,
    PartitionCostModel,
    PartitionPlan,
    Tiling,
    WorkloadType,
    classify_workload,
    crossbar_utilisation,
    fixed_partition,
    layer_shapes,
    layer_tiling,
    plan_partition,
)
from .programming import ProgrammingStats, program_conductances

__all__ = [
    "CORRECTIONS",
    "DENOISERS",
    "PRESETS",
    "ConversionReport",
    "CrossbarPool",
    "CrossbarStats",
    "MVMResult",
    "Material",
    "PartitionCostModel",
    "PartitionPlan",
    "ProgrammingStats",
    "RRAMConfig",
    "RRAMConv1D",
    "RRAMConv1d",
    "RRAMConv2d",
    "RRAMLinear",
    "RRAMMultiheadAttention",
    "RRAMSummary",
    "Tiling",
    "WorkloadType",
    "classify_workload",
    "conversion_report",
    "convert_",
    "crossbar_utilisation",
    "denoise",
    "estimate_lambda",
    "fixed_partition",
    "gcv_lambda",
    "get_material",
    "hwa_noise",
    "hwa_noise_",
    "lambda_errors",
    "layer_shapes",
    "layer_tiling",
    "list_materials",
    "mvm",
    "plan_partition",
    "preset",
    "program_conductances",
    "register_material",
    "summary",
    "to_digital",
]
