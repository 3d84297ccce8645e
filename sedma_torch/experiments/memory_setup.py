"""The dual memory of an experiment run: Hydra group ``memory`` -> long-term store + conversion.

``memory.enabled``: open a :class:`sedma_torch.memory.LongTermMemory` at ``memory.url``
(null: ``$SEDMA_MEMORY_URL``, else ``$SEDMA_MEMORY_PATH``, else ``sedma_memory.db`` in the
per-user data folder, :func:`default_memory_path`: ``$XDG_DATA_HOME/sedma_torch`` or
``~/.local/share/sedma_torch``, never the working directory). Converted layers then read
and write their adaptive lambda there, and the deployment hook its history, so later runs
start from earlier ones; :meth:`ExperimentMemory.describe` is the line a run prints about
it (``memory=none`` or a fresh ``memory.url`` runs without the earlier records). ``memory.partition``: ``fixed`` (every layer on ``rram.tile_rows x tile_cols``)
or ``memory_guided`` (``sedma_torch.rram.plan_partition``, SPEC.md Eq. 4, remembered per
workload type).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..rram import RRAMConfig, convert_
from ..rram.partition import plan_partition

PARTITIONS = ("fixed", "memory_guided")
STORE_NAME = "sedma_memory.db"


def user_data_dir() -> Path:
    """This user's data folder for sedma_torch (XDG / platformdirs' ``user_data_dir`` on
    Linux): ``$XDG_DATA_HOME/sedma_torch``, else ``~/.local/share/sedma_torch``."""
    base = os.environ.get("XDG_DATA_HOME", "").strip()
    root = Path(base).expanduser() if base and Path(base).expanduser().is_absolute() else None
    return (root or Path.home() / ".local" / "share") / "sedma_torch"


def default_memory_path() -> Path:
    """Where a run's long-term memory lives when ``memory.url`` is null and neither
    ``$SEDMA_MEMORY_URL`` nor ``$SEDMA_MEMORY_PATH`` is set."""
    return user_data_dir() / STORE_NAME


def resolve_memory_url(url: str | None) -> str:
    """``memory.url``, else ``$SEDMA_MEMORY_URL``, else ``$SEDMA_MEMORY_PATH``, else
    :func:`default_memory_path`."""
    if url:
        return str(url)
    env = os.environ.get("SEDMA_MEMORY_URL") or os.environ.get("SEDMA_MEMORY_PATH")
    return env or str(default_memory_path())


@dataclass
class ExperimentMemory:
    """Long-term memory (or None) and the partition rule used for every conversion."""

    long_term: Any = None
    partition: str = "fixed"
    stm_window: int = 100
    records_at_start: int = 0
    """Keyed records (lambda, partition, deployment decisions) the store held when opened."""

    @property
    def store(self) -> str | None:
        """The store's file path or password-free URL; None without long-term memory."""
        if self.long_term is None:
            return None
        path = getattr(self.long_term, "path", None)
        return str(path) if path is not None else str(self.long_term.url)

    def describe(self) -> str:
        """One line for the run's output: which store, how many records it started with,
        that later runs start from it, and how to run without it."""
        if self.long_term is None:
            return (
                "memory: none (memory=none): adaptive lambda and partitions start from scratch "
                "and nothing is stored"
            )
        kind = "SQLite file" if getattr(self.long_term, "path", None) else "store"
        return (
            f"memory: {kind} {self.store}, {self.records_at_start} record(s) at start; this "
            "run's records are kept there and later runs start from them (run without: "
            "memory=none, or a fresh memory.url=PATH)"
        )

    def info(self) -> dict[str, Any]:
        """``results.json``'s ``memory`` entry."""
        return {"store": self.store, "records_at_start": self.records_at_start}

    def convert(self, model: nn.Module, config: RRAMConfig, **kwargs: Any) -> nn.Module:
        """``convert_`` with this run's memory and partition rule."""
        plan = None
        if self.partition == "memory_guided":
            plan = plan_partition(model, config, memory=self.long_term)
        from ..memory import ShortTermMemory

        short_term = ShortTermMemory(window=self.stm_window)
        return convert_(
            model, config, partition=plan, memory=self.long_term, short_term=short_term, **kwargs
        )

    def close(self) -> None:
        if self.long_term is not None:
            self.long_term.close()


def open_memory(memory_cfg: Mapping[str, Any] | None) -> ExperimentMemory:
    """The run's memory from the ``memory`` config group (None: no long-term memory)."""
    if not memory_cfg:
        return ExperimentMemory()
    unknown = set(memory_cfg) - {
        "enabled",
        "url",
        "capacity",
        "lru_size",
        "stm_window",
        "partition",
    }
    if unknown:
        raise ValueError(
            f"memory: unknown key(s) {sorted(unknown)}; known: enabled, url, capacity, "
            "lru_size, stm_window, partition"
        )
    partition = memory_cfg.get("partition", "fixed")
    if partition not in PARTITIONS:
        raise ValueError(f"memory.partition must be one of {PARTITIONS}, got {partition!r}")
    window = memory_cfg.get("stm_window", 100)
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"memory.stm_window must be an int >= 1, got {window!r}")
    if not memory_cfg.get("enabled", True):
        return ExperimentMemory(None, partition, window)
    from ..memory import LongTermMemory

    ltm = LongTermMemory(
        resolve_memory_url(memory_cfg.get("url")),
        capacity=int(memory_cfg.get("capacity", 10_000)),
        lru_size=int(memory_cfg.get("lru_size", 4096)),
    )
    return ExperimentMemory(ltm, partition, window, ltm.record_count())


__all__ = [
    "PARTITIONS",
    "ExperimentMemory",
    "default_memory_path",
    "open_memory",
    "resolve_memory_url",
    "user_data_dir",
]
