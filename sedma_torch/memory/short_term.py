"""Short-term memory: bounded in-process windows and EWMAs of recent statistics.

One :class:`ShortTermMemory` holds, per key (``"error/taox_hfox"``, ``"peer_load/rank3"``,
``"step_time_ms"``, ...), the last ``window`` values in a ``collections.deque(maxlen=window)``,
their running sum (so :meth:`ShortTermMemory.mean` is O(1)) and an exponentially weighted
moving average. An update is a few dictionary and deque operations (about 1 µs on a CPU,
see ``scripts/bench_memory.py``), cheap enough to call on every forward pass.

Nothing here is persistent or shared between processes: that is what
:class:`sedma_torch.memory.LongTermMemory` is for. Not thread-safe: use one instance per
thread or guard it with a lock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

__all__ = ["ShortTermMemory"]


class _Series:
    """Window, running sum and EWMA of one key."""

    __slots__ = ("ewma", "since_resum", "total", "updates", "window")

    def __init__(self, window: int, first: float) -> None:
        self.window: deque[float] = deque((first,), maxlen=window)
        self.total = first
        self.ewma = first
        self.updates = 1
        self.since_resum = 0


class ShortTermMemory:
    """Bounded windows (last ``window`` values) and EWMAs per key.

    Args:
        window: number of most recent values kept per key (``>= 1``; default 100).
        ewma_alpha: weight of the newest value in the EWMA, in ``(0, 1]`` (default 0.1). The
            first value of a key initialises its EWMA; after that
            ``ewma = alpha * value + (1 - alpha) * ewma``.

    Values must be finite real numbers: NaN or ±inf raises ``ValueError`` naming the key
    (a NaN would silently poison the running sum and the EWMA).

    Example::

        stm = ShortTermMemory(window=100, ewma_alpha=0.1)
        stm.update("error", 0.012)
        stm.mean("error"), stm.ewma("error"), stm.values("error"), stm.count("error")
    """

    def __init__(self, window: int = 100, ewma_alpha: float = 0.1) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if isinstance(ewma_alpha, bool) or not isinstance(ewma_alpha, int | float):
            raise TypeError(f"ewma_alpha must be a float in (0, 1], got {ewma_alpha!r}")
        if not (0.0 < float(ewma_alpha) <= 1.0):
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha!r}")
        self.window = window
        self.ewma_alpha = float(ewma_alpha)
        self._series: dict[str, _Series] = {}

    def update(self, key: str, value: float) -> None:
        """Append ``value`` to the window of ``key`` and update its EWMA.

        ``value`` is a real number: a Python int or float, a NumPy scalar or a one-element
        tensor (a CUDA tensor forces a device synchronisation); strings and bools are refused.
        """
        x = value
        if type(x) is not float:
            if isinstance(x, bool) or not hasattr(x, "__float__"):
                raise TypeError(
                    f"ShortTermMemory.update: value for key {key!r} must be a real number, "
                    f"got {type(value).__name__} {value!r}"
                )
            x = float(x)
        if not math.isfinite(x):
            raise ValueError(
                f"ShortTermMemory.update: value for key {key!r} must be finite, got {x}"
            )
        series = self._series.get(key)
        if series is None:
            if not isinstance(key, str) or not key:
                raise ValueError(f"ShortTermMemory key must be a non-empty string, got {key!r}")
            self._series[key] = _Series(self.window, x)
            return
        window = series.window
        if len(window) == self.window:
            series.total += x - window[0]
            series.since_resum += 1
        else:
            series.total += x
        window.append(x)
        if series.since_resum >= self.window:
            # the running sum drifts by rounding after many evictions: recompute it exactly
            # once per window length of evictions (amortised O(1))
            series.total = math.fsum(window)
            series.since_resum = 0
        series.ewma += self.ewma_alpha * (x - series.ewma)
        series.updates += 1

    def _get(self, key: str) -> _Series:
        series = self._series.get(key)
        if series is None:
            known = ", ".join(sorted(self._series)[:20]) or "none"
            raise KeyError(f"ShortTermMemory has no values for key {key!r} (known keys: {known})")
        return series

    def mean(self, key: str) -> float:
        """Mean of the values in the window of ``key``; ``KeyError`` when it has none."""
        series = self._get(key)
        return series.total / len(series.window)

    def ewma(self, key: str) -> float:
        """EWMA of every value ever given for ``key``; ``KeyError`` when it has none."""
        return self._get(key).ewma

    def values(self, key: str) -> list[float]:
        """The values in the window of ``key``, oldest first (``[]`` for an unknown key)."""
        series = self._series.get(key)
        return list(series.window) if series is not None else []

    def count(self, key: str) -> int:
        """Number of values in the window of ``key`` (``<= window``; 0 for an unknown key)."""
        series = self._series.get(key)
        return len(series.window) if series is not None else 0

    def total_updates(self, key: str) -> int:
        """Number of values ever given for ``key``, including those that left the window."""
        series = self._series.get(key)
        return series.updates if series is not None else 0

    def keys(self) -> list[str]:
        """Keys with at least one value, in first-update order."""
        return list(self._series)

    def clear(self, key: str | None = None) -> None:
        """Forget ``key`` (or every key when None)."""
        if key is None:
            self._series.clear()
        else:
            self._series.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._series

    def __iter__(self) -> Iterator[str]:
        return iter(self._series)

    def __len__(self) -> int:
        return len(self._series)

    def __repr__(self) -> str:
        return (
            f"ShortTermMemory(window={self.window}, ewma_alpha={self.ewma_alpha}, "
            f"keys={len(self._series)})"
        )
