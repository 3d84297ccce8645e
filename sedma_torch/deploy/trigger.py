"""Recompile trigger (SPEC.md Eq. 14) and the deployment history it reads.

``recompile = (current_perf / expected_perf < theta) or (resource_util > rho)`` with
theta = 0.8 and rho = 0.85. Both comparisons are strict: a ratio of exactly 0.8 or a
utilisation of exactly 0.85 does not trigger.

``expected_perf`` is predicted from the deployment history of the same pattern
(:func:`expected_performance`: the median performance of the newest ``k`` records),
read from long-term memory (``memory.deployment_history(pattern)``) when one is given,
otherwise from an :class:`InProcessDeploymentMemory` with the same method names.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

THETA = 0.8
"""Performance ratio below which placement is recompiled."""
RHO = 0.85
"""Resource utilisation above which placement is recompiled."""


class DeploymentMemory(Protocol):
    """The part of the dual-memory API layer 3 uses (``LongTermMemory`` satisfies it)."""

    def record_deployment(self, pattern: str, placement: dict, performance: float) -> None: ...

    def deployment_history(self, pattern: str, limit: int = 100) -> list[dict]: ...


class InProcessDeploymentMemory:
    """In-process stand-in for long-term memory's deployment records (and put/get).

    Same method names and return shapes as ``sedma_torch.memory.LongTermMemory``;
    nothing outlives the process.
    """

    def __init__(self) -> None:
        self._deployments: dict[str, list[dict]] = {}
        self._items: dict[tuple[str, str], dict] = {}

    def record_deployment(self, pattern: str, placement: dict, performance: float) -> None:
        _check_perf(performance, "performance")
        self._deployments.setdefault(pattern, []).append(
            {
                "placement": dict(placement),
                "performance": float(performance),
                "created_at": time.time(),
            }
        )

    def deployment_history(self, pattern: str, limit: int = 100) -> list[dict]:
        """Newest first, at most ``limit`` records."""
        return [dict(r) for r in reversed(self._deployments.get(pattern, []))][:limit]

    def put(self, kind: str, key: str, value: dict, score: float | None = None) -> None:
        self._items[(kind, key)] = dict(value)

    def get(self, kind: str, key: str) -> dict | None:
        item = self._items.get((kind, key))
        return dict(item) if item is not None else None


@dataclass(frozen=True)
class RecompileDecision:
    """Outcome of Eq. 14 with the values that produced it."""

    recompile: bool
    performance_ratio: float | None
    """current / expected, ``None`` when no expectation exists yet."""
    resource_util: float
    reasons: tuple[str, ...]
    """Which clause fired: ``"performance"`` and/or ``"utilisation"``."""

    def __bool__(self) -> bool:
        return self.recompile


def should_recompile(
    current_perf: float,
    expected_perf: float | None,
    resource_util: float,
    *,
    theta: float = THETA,
    rho: float = RHO,
) -> RecompileDecision:
    """Eq. 14. ``expected_perf=None`` (no history) leaves only the utilisation clause.

    Performance is any higher-is-better rate (e.g. samples/s); ``resource_util`` is a
    fraction in [0, 1] (e.g. the larger of CPU and memory utilisation).
    """
    _check_perf(current_perf, "current_perf")
    if expected_perf is not None:
        _check_perf(expected_perf, "expected_perf")
        if expected_perf <= 0:
            raise ValueError(f"expected_perf must be > 0, got {expected_perf}")
    if not isinstance(resource_util, int | float) or not 0.0 <= resource_util <= 1.0:
        raise ValueError(f"resource_util must be a fraction in [0, 1], got {resource_util!r}")
    if not 0.0 < theta <= 1.0:
        raise ValueError(f"theta must be in (0, 1], got {theta}")
    if not 0.0 < rho <= 1.0:
        raise ValueError(f"rho must be in (0, 1], got {rho}")
    ratio = None if expected_perf is None else current_perf / expected_perf
    reasons = []
    if ratio is not None and ratio < theta:
        reasons.append("performance")
    if resource_util > rho:
        reasons.append("utilisation")
    return RecompileDecision(bool(reasons), ratio, float(resource_util), tuple(reasons))


def expected_performance(history: Sequence[dict[str, Any]], *, k: int = 10) -> float | None:
    """Median ``performance`` of the newest ``k`` records (newest first), or None if empty.

    The median ignores a single outlier run; ``k`` bounds how far back the
    expectation looks, so it follows a workload that legitimately changes.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = [float(r["performance"]) for r in list(history)[:k] if "performance" in r]
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else None


def _check_perf(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")


__all__ = [
    "RHO",
    "THETA",
    "DeploymentMemory",
    "InProcessDeploymentMemory",
    "RecompileDecision",
    "expected_performance",
    "should_recompile",
]
