"""sedma_torch: simulated RRAM in-memory compute and memory-aware distributed training for PyTorch.

The public API (nothing else is promised)::

    import sedma_torch as st
    cfg = st.RRAMConfig(material="taox_hfox", correction="first_order")
    layer = st.RRAMLinear(512, 256, config=cfg)
    model = st.convert_(model, cfg)
    print(st.summary(model))
    mem = st.memory.LongTermMemory("sqlite:///sedma.db")   # or postgresql+psycopg://...
"""

from . import _quiet

_quiet.install()  # no "No CUDA runtime is found, using CUDA_HOME=..." on CPU machines

from . import memory, rram  # noqa: E402
from .rram import (  # noqa: E402
    PRESETS,
    RRAMConfig,
    RRAMConv1d,
    RRAMConv2d,
    RRAMLinear,
    RRAMMultiheadAttention,
    conversion_report,
    convert_,
    preset,
    summary,
    to_digital,
)

__version__ = "0.1.0"

_LAZY = ("data", "deploy", "distributed", "experiments", "metrics", "models")


def __getattr__(name: str):
    """``st.distributed``, ``st.deploy``, ... imported on first use (they pull in heavier
    dependencies: torch.distributed, Lattica, the Kubernetes schema, transformers)."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sedma_torch' has no attribute {name!r}")


__all__ = [
    "PRESETS",
    "RRAMConfig",
    "RRAMConv1d",
    "RRAMConv2d",
    "RRAMLinear",
    "RRAMMultiheadAttention",
    "__version__",
    "conversion_report",
    "convert_",
    "memory",
    "preset",
    "rram",
    "summary",
    "to_digital",
]
