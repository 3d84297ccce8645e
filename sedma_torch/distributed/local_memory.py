"""In-process stand-in for the long-term memory, used when no ``memory`` is given.

Layer 2 reads and writes four things of the dual-memory API: transfer outcomes
(``record_transfer`` / ``transfers`` / ``peer_profile``), cache access statistics
(``record_cache_access`` / ``cache_stats``) and small records (``put`` / ``get``, used for
the selector's learned weights). :class:`InProcessMemory` implements exactly those methods
with the same signatures and return shapes as :class:`sedma_torch.memory.LongTermMemory`,
so the distributed code takes either one (duck-typed) and nothing outlives the process
when no persistent store is given.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["InProcessMemory"]


class InProcessMemory:
    """Transfer history, cache statistics and key/value records kept in this process.

    Args:
        capacity: the most transfer records kept (oldest dropped first), >= 1.
        clock: the time source in unix seconds (tests pass a fake one).
    """

    def __init__(self, capacity: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self._transfers: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._cache: dict[str, dict[str, float]] = {}
        self._records: dict[tuple[str, str], dict[str, Any]] = {}
        self._clock = clock

    def record_transfer(self, peer: str, ok: bool, latency_ms: float, nbytes: int) -> None:
        """Store one transfer outcome with ``peer``: success, latency (ms), bytes moved."""
        self._transfers.append(
            {
                "peer": str(peer),
                "ok": bool(ok),
                "latency_ms": float(latency_ms),
                "nbytes": int(nbytes),
                "created_at": self._clock(),
            }
        )

    def transfers(self, peer: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        """Transfer records, newest first, optionally of one ``peer`` only."""
        out = [t for t in reversed(self._transfers) if peer is None or t["peer"] == peer]
        return [dict(t) for t in out[:limit]]

    def peer_profile(self, peer: str) -> dict[str, Any] | None:
        """Aggregate of ``peer``'s transfers (attempts, successes, success_rate, mean latency)."""
        rows = [t for t in self._transfers if t["peer"] == peer]
        if not rows:
            return None
        ok = sum(t["ok"] for t in rows)
        return {
            "peer": peer,
            "attempts": len(rows),
            "successes": ok,
            "success_rate": ok / len(rows),
            "mean_latency_ms": sum(t["latency_ms"] for t in rows) / len(rows),
            "bytes": sum(t["nbytes"] for t in rows),
        }

    def record_cache_access(self, content_id: str, size_bytes: int) -> None:
        """Count one access to ``content_id`` (of ``size_bytes`` bytes) now."""
        now = self._clock()
        row = self._cache.get(content_id)
        if row is None:
            self._cache[content_id] = {
                "accesses": 1,
                "size_bytes": int(size_bytes),
                "first_access": now,
                "last_access": now,
            }
        else:
            row["accesses"] += 1
            row["size_bytes"] = int(size_bytes)
            row["last_access"] = now

    def cache_stats(self, content_id: str) -> dict[str, Any] | None:
        """``{"accesses", "size_bytes", "first_access", "last_access"}`` (unix s) or None."""
        row = self._cache.get(content_id)
        return None if row is None else dict(row)

    def put(self, kind: str, key: str, value: dict, score: float | None = None) -> None:
        """Store the record ``value`` under (``kind``, ``key``); ``score`` is ignored here."""
        if not isinstance(value, dict):
            raise TypeError(f"value must be a dict, got {type(value).__name__}")
        self._records[(kind, key)] = dict(value)

    def get(self, kind: str, key: str) -> dict | None:
        """The record stored under (``kind``, ``key``), or None."""
        value = self._records.get((kind, key))
        return None if value is None else dict(value)
