"""Precise silencing of third-party output that says nothing to a user of this package.

``torch.utils.cpp_extension`` logs ``No CUDA runtime is found, using CUDA_HOME=...`` when it
is imported on a machine with a CUDA toolkit folder but no CUDA device; TorchInductor
imports it whenever ``torch.compile`` compiles (write-and-verify of large arrays, the fused
read). On such a machine the message is true and irrelevant (the CPU kernels never use
CUDA), so :func:`install` drops exactly that record, and only while
``torch.cuda.is_available()`` is false; every other record of that logger passes.
"""

from __future__ import annotations

import logging

_LOGGER = "torch.utils.cpp_extension"
_PREFIX = "No CUDA runtime is found"


class _NoCudaHomeNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(_PREFIX):
            return True
        import torch

        return bool(torch.cuda.is_available())


def install() -> None:
    """Add the filter once (idempotent); call before torch.utils.cpp_extension is imported."""
    logger = logging.getLogger(_LOGGER)
    if not any(isinstance(f, _NoCudaHomeNotice) for f in logger.filters):
        logger.addFilter(_NoCudaHomeNotice())


__all__ = ["install"]
