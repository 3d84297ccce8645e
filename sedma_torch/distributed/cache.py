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

Copies and sizes
----------------
The cache holds its own compact copy of every value and counts exactly the bytes that copy
keeps alive, so the capacity bounds the memory the cache actually holds:

* a tensor is stored as a detached, contiguous clone (``numel * element_size`` bytes of a
  storage of its own): a view of a large tensor (a slice, one element) costs its own size
  and does not keep the large tensor's storage alive, and a later in-place change of the
  caller's tensor does not reach the cache. :meth:`UtilityCache.get` returns a fresh clone
  (copy-out), so changing a returned tensor does not change the cached one either; the copy
  costs one memory copy of the item per hit, far less than the fetch it saves. Only dense
  (strided) tensors are accepted;
* ``bytes`` (immutable) are stored as they are; a ``bytearray`` or ``memoryview`` is copied
  into ``bytes`` (its ``nbytes``, not its length in items) and ``get`` returns those
  ``bytes``.
"""

from __future__ import annotations

import math
import numbers
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


def _own_copy(value: Any) -> tuple[Any, int]:
    """(the copy the cache keeps of ``value``, the bytes that copy keeps alive)."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"cache values must be dense (strided) tensors, got {value.layout}")
        t = value.detach().resolve_conj().resolve_neg()
        copy = t.clone(memory_format=torch.contiguous_format)
        return copy, copy.untyped_storage().nbytes()
    if isinstance(value, bytes):
        return value, len(value)
    if isinstance(value, bytearray | memoryview):
        data = value.tobytes() if isinstance(value, memoryview) else bytes(value)
        return data, len(data)
    raise TypeError(f"cache values must be tensors or bytes, got {type(value).__name__}")


def _nbytes(value: Any) -> int:
    """Bytes the cache's copy of ``value`` will hold (computed without copying)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, memoryview):
        return value.nbytes  # not len(): that counts items of the first dimension
    if isinstance(value, bytes | bytearray):
        return len(value)
    raise TypeError(f"cache values must be tensors or bytes, got {type(value).__name__}")


def _positive(name: str, value: object) -> float:
    """``value`` as a float, if it is a finite real number > 0 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number > 0, got {type(value).__name__} {value!r}")
    x = float(value)
    if not (math.isfinite(x) and x > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return x


class UtilityCache:
    """A size-bounded cache of tensors (or bytes) keyed by content id, evicting by Eq. 10.

    Args:
        capacity_mb: capacity in MB (1e6 bytes): a finite real number >= 1e-6 (not a bool;
            bad values raise ``TypeError``/``ValueError`` naming the argument).
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
        capacity = _positive("capacity_mb", capacity_mb)
        self.capacity_bytes = int(capacity * 1e6)
        if self.capacity_bytes < 1:
            raise ValueError(f"capacity_mb must be at least 1e-6 (one byte), got {capacity_mb!r}")
        self.recency_decay_s = _positive("recency_decay_s", recency_decay_s)
        self.min_window_s = _positive("min_window_s", min_window_s)
        if not callable(clock):
            raise TypeError(f"clock must be callable, got {type(clock).__name__} {clock!r}")
        if memory is not None:
            missing = [
                m
                for m in ("record_cache_access", "cache_stats")
                if not callable(getattr(memory, m, None))
            ]
            if missing:
                raise TypeError(
                    f"memory must provide {' and '.join(missing)} (a LongTermMemory or an "
                    f"InProcessMemory), got {type(memory).__name__}"
                )
        self.memory = memory if memory is not None else InProcessMemory(clock=clock)
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
        """Bytes held by cached items: the sizes of the cache's own copies (the storage
        bytes they keep alive), never more than ``capacity_bytes``."""
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

        A tensor is returned as a fresh copy (changing it does not change the cache); bytes
        as the cached ``bytes``. ``size_bytes`` is the expected size of a missing item
        (recorded with the access); a hit records the cached item's size.
        """
        with self._lock:
            entry = self._items.get(content_id)
            if entry is not None:
                self.stats.hits += 1
                self.memory.record_cache_access(content_id, entry[1])
                value = entry[0]
                return value.clone() if isinstance(value, torch.Tensor) else value
            self.stats.misses += 1
            if size_bytes is not None:
                self.memory.record_cache_access(content_id, int(size_bytes))
            return None

    def put(self, content_id: str, value: Any) -> bool:
        """Cache a copy of ``value`` (tensor or bytes, see the module docstring) under
        ``content_id``, evicting lowest-utility items as needed. Returns False (and copies
        nothing) when the value is larger than the capacity."""
        if _nbytes(value) > self.capacity_bytes:
            with self._lock:
                self.stats.rejected += 1
            return False
        value, size = _own_copy(value)
        with self._lock:
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
