"""Dual memory: a persistent long-term store (SQLite or PostgreSQL) and in-process short-term
windows, shared by the three SEDMA layers.

- :class:`LongTermMemory`: best λ per (material, workload), best partition per workload,
  peer profiles and transfer history, cache access statistics, deployment outcomes; bounded
  capacity with least-recently-updated eviction; safe for several processes at once.
- :class:`ShortTermMemory`: last ``window`` values and an EWMA per key, O(1) per update.
"""

from .long_term import (
    APPLICATION,
    BUILTIN_KINDS,
    DEFAULT_PATH,
    SCHEMA_VERSION,
    LongTermMemory,
    MemoryEntry,
    MemoryStoreError,
)
from .short_term import ShortTermMemory

__all__ = [
    "APPLICATION",
    "BUILTIN_KINDS",
    "DEFAULT_PATH",
    "SCHEMA_VERSION",
    "LongTermMemory",
    "MemoryEntry",
    "MemoryStoreError",
    "ShortTermMemory",
]
