"""Utility cache in front of tensor fetches (SPEC Eq. 10).

``utility(d) = access_freq(d) * recency(d) / size(d)`` with

* ``access_freq``: accesses per hour, from the memory's cache statistics:
  ``accesses / max(now - first_access, min_window_s)`` converted to 1/h (the floor keeps
  a just-seen item from getting an infinite frequency);
* ``recency``: ``exp(-(now - last_access) / recency_decay_s)``, in (0, 1];
* ``size``: the item's size in MB (1e6 bytes).

When an insertion would exceed the capacity, cached items are evicted lowest utility
first (ties: the least recently accessed, then the key) until the new one fits; an item
larger than the whole capacity is not cached. Every :meth:`UtilityCache.get` counts as an
access of its content id (hit or miss) in the memory: LTM's ``record_cache_access`` when
a long-term memory is given, so frequencies carry over to later runs.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .local_memory import InProcessMemory

__all__ = ["CacheStats", "UtilityCache"]


@dataclass
class CacheStats:
    """Counters of a :class:`UtilityCache`."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    rejected: int = 0
    """Items not cached because they are larger than the capacity."""

    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0 before the first lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


def _size_bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, bytes | bytearray | memoryview):
        return len(value)
    raise TypeError(f"cache values must be tensors or bytes, got {type(value).__name__}")


class UtilityCache:
    """A size-bounded cache of tensors (or bytes) keyed by content id, evicting by Eq. 10.

    Args:
        capacity_mb: capacity in MB (1e6 bytes), > 0.
        memory: where access statistics live (duck-typed ``record_cache_access`` /
            ``cache_stats``; None: an :class:`InProcessMemory`).
        recency_decay_s: time constant of the recency decay in seconds (> 0).
        min_window_s: floor on the observation window of the access frequency (s, > 0).
        clock: time source in unix seconds (the memory's timestamps must use the same).
    """

    def __init__(
        self,
        capacity_mb: float,
        *,
        memory: Any | None = None,
        recency_decay_s: float = 600.0,
        min_window_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, value in (
            ("capacity_mb", capacity_mb),
            ("recency_decay_s", recency_decay_s),
            ("min_window_s", min_window_s),
        ):
            if not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        self.capacity_bytes = int(capacity_mb * 1e6)
        self.memory = memory if memory is not None else InProcessMemory(clock=clock)
        self.recency_decay_s = float(recency_decay_s)
        self.min_window_s = float(min_window_s)
        self.clock = clock
        self.stats = CacheStats()
        self._items: dict[str, tuple[Any, int]] = {}
        self._used = 0
        self._lock = threading.Lock()

    def __contains__(self, content_id: str) -> bool:
        return content_id in self._items

    def __len__(self) -> int:
        return len(self._items)

    @property
    def used_bytes(self) -> int:
        """Bytes held by cached items."""
        return self._used

    def utility(self, content_id: str, now: float | None = None) -> float:
        """Eq. 10 utility of ``content_id`` from its stored access statistics (0 if none)."""
        stats = self.memory.cache_stats(content_id)
        if stats is None or stats["accesses"] <= 0:
            return 0.0
        now = self.clock() if now is None else now
        window_h = max(now - stats["first_access"], self.min_window_s) / 3600.0
        frequency = stats["accesses"] / window_h
        recency = math.exp(-max(now - stats["last_access"], 0.0) / self.recency_decay_s)
        size_mb = max(stats["size_bytes"], 1) / 1e6
        return frequency * recency / size_mb

    def eviction_order(self) -> list[str]:
        """Cached content ids, the next to be evicted first."""
        now = self.clock()
        keyed = []
        for cid in self._items:
            stats = self.memory.cache_stats(cid)
            last = stats["last_access"] if stats else -math.inf
            keyed.append((self.utility(cid, now), last, cid))
        return [cid for _, _, cid in sorted(keyed)]

    def get(self, content_id: str, size_bytes: int | None = None) -> Any | None:
        """The cached value of ``content_id`` or None; counts an access either way.

        ``size_bytes`` is the expected size of a missing item (recorded with the access);
        a hit records the cached item's size.
        """
        with self._lock:
            entry = self._items.get(content_id)
            if entry is not None:
                self.stats.hits += 1
                self.memory.record_cache_access(content_id, entry[1])
                return entry[0]
            self.stats.misses += 1
            if size_bytes is not None:
                self.memory.record_cache_access(content_id, int(size_bytes))
            return None

    def put(self, content_id: str, value: Any) -> bool:
        """Cache ``value`` (tensor or bytes) under ``content_id``, evicting lowest-utility
        items as needed. Returns False when the value is larger than the capacity."""
        size = _size_bytes(value)
        with self._lock:
            if size > self.capacity_bytes:
                self.stats.rejected += 1
                return False
            if self.memory.cache_stats(content_id) is None:
                self.memory.record_cache_access(content_id, size)
            old = self._items.pop(content_id, None)
            if old is not None:
                self._used -= old[1]
            if self._used + size > self.capacity_bytes:
                for victim in self.eviction_order():
                    self._used -= self._items.pop(victim)[1]
                    self.stats.evictions += 1
                    if self._used + size <= self.capacity_bytes:
                        break
            self._items[content_id] = (value, size)
            self._used += size
            return True
