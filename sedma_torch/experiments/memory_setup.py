"""The dual memory of an experiment run: Hydra group ``memory`` -> long-term store + conversion.

``memory.enabled``: open a :class:`sedma_torch.memory.LongTermMemory` at ``memory.url``
(null: ``$SEDMA_MEMORY_URL``, ``$SEDMA_MEMORY_PATH`` or ``./sedma_memory.db``). Converted
layers then read and write their adaptive lambda there, and the deployment hook its
history. ``memory.partition``: ``fixed`` (every layer on ``rram.tile_rows x tile_cols``)
or ``memory_guided`` (``sedma_torch.rram.plan_partition``, SPEC.md Eq. 4, remembered per
workload type).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..rram import RRAMConfig, convert_
from ..rram.partition import plan_partition

PARTITIONS = ("fixed", "memory_guided")


@dataclass
class ExperimentMemory:
    """Long-term memory (or None) and the partition rule used for every conversion."""

    long_term: Any = None
    partition: str = "fixed"
    stm_window: int = 100

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
        memory_cfg.get("url"),
        capacity=int(memory_cfg.get("capacity", 10_000)),
        lru_size=int(memory_cfg.get("lru_size", 4096)),
    )
    return ExperimentMemory(ltm, partition, window)


__all__ = ["PARTITIONS", "ExperimentMemory", "open_memory"]
