"""Peer scoring (SPEC Eq. 7) and weight adaptation from transfer outcomes (Eq. 8-9).

Score of candidate peer ``j`` (Eq. 7)::

    s_j = w1 * availability_j + w2 * (1 / latency_j) + w3 * mem_free_j

The three raw terms have different units (a fraction, 1/ms, GB), so each is normalised
over the candidate set before weighting (max-normalisation, every term in [0, 1], the best
candidate on a term gets 1):

* availability: already a fraction in [0, 1] (idle CPU cores or idle GPU); used as is,
  clipped to [0, 1];
* latency: ``min_k latency_k / latency_j`` (= (1/latency_j) / max_k (1/latency_k));
  latencies below ``min_latency_ms`` are raised to it, so a 0 ms loopback does not give
  an infinite term;
* free memory: ``mem_free_j / max_k mem_free_k`` (0 when every candidate has none).

Weight adaptation (Eq. 8-9): ``w <- w + eta * d success_rate / d w`` with eta = 0.01.
The success rate a weight vector achieves is estimated from the transfer history (features
``x_t`` of the chosen peer when it was chosen, outcome ``y_t`` in {0, 1}) by re-weighting
each past transfer with how strongly ``w`` favours it (a softmax policy of temperature
``tau`` over the history)::

    pi_t(w) = exp(w . x_t / tau) / sum_u exp(w . x_u / tau)
    success_rate(w) = sum_t pi_t(w) y_t          (= completed / attempted when tau -> inf)
    d success_rate / d w = (E_pi[x y] - E_pi[x] E_pi[y]) / tau

so a weight grows when the peers that scored high on its term completed their transfers
more often than the average. Weights are clipped at 0 after the update (a term never
counts negatively). Outcomes are stored in the long-term memory (``record_transfer``) when
one is given, else in an :class:`InProcessMemory`; the learned weights and the history
the gradient is estimated from (the features of each chosen peer and the outcome, the last
``history`` transfers) are saved with ``memory.put("peer_selector", name, {"weights":
[...], "history": [[x1, x2, x3, y], ...]})`` at every :meth:`PeerSelector.update_weights`,
so a restarted peer (same ``name``) reads both back and continues the adaptation exactly
where it stopped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .local_memory import InProcessMemory

__all__ = ["PeerFeatures", "PeerSelector", "normalised_terms"]

TERMS = ("availability", "inverse_latency", "mem_free")


@dataclass(frozen=True)
class PeerFeatures:
    """Raw measurements of one candidate peer.

    Attributes:
        availability: idle fraction of the peer's CPU cores (or GPU), in [0, 1].
        latency_ms: round-trip time to the peer in milliseconds (> 0; ``inf`` = unreachable).
        mem_free_gb: free memory on the peer in GB (>= 0).
    """

    availability: float
    latency_ms: float
    mem_free_gb: float

    def __post_init__(self) -> None:
        for name in ("availability", "latency_ms", "mem_free_gb"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value):
                raise ValueError(f"PeerFeatures.{name} must be a number, got {value!r}")
        if self.latency_ms <= 0:
            raise ValueError(f"PeerFeatures.latency_ms must be > 0, got {self.latency_ms}")
        if self.mem_free_gb < 0:
            raise ValueError(f"PeerFeatures.mem_free_gb must be >= 0, got {self.mem_free_gb}")


def normalised_terms(
    candidates: Mapping[Any, PeerFeatures], min_latency_ms: float = 1e-3
) -> dict[Any, np.ndarray]:
    """The three Eq. 7 terms of each candidate, each in [0, 1] (see the module docstring).

    Unreachable candidates (``latency_ms = inf``) are left out.
    """
    reachable = {p: f for p, f in candidates.items() if math.isfinite(f.latency_ms)}
    if not reachable:
        return {}
    lat = {p: max(f.latency_ms, min_latency_ms) for p, f in reachable.items()}
    best_lat = min(lat.values())
    best_mem = max(f.mem_free_gb for f in reachable.values())
    return {
        p: np.array(
            [
                min(max(f.availability, 0.0), 1.0),
                best_lat / lat[p],
                f.mem_free_gb / best_mem if best_mem > 0 else 0.0,
            ]
        )
        for p, f in reachable.items()
    }


def _stored_history(rows: Any) -> list[tuple[np.ndarray, float]]:
    """(features, outcome) pairs from a stored ``history``; malformed rows are skipped."""
    out = []
    for row in rows if isinstance(rows, list) else ():
        try:
            values = np.asarray(row, dtype=np.float64)
        except (TypeError, ValueError):
            continue
        if values.shape == (4,) and np.all(np.isfinite(values)) and values[3] in (0.0, 1.0):
            out.append((values[:3].copy(), float(values[3])))
    return out


class PeerSelector:
    """Scores peers with Eq. 7, picks the top ``k`` and adapts its weights (Eq. 8-9).

    Args:
        weights: initial (w1, w2, w3) for availability, 1/latency, free memory (>= 0,
            not all 0); overridden by weights stored in ``memory`` under ``name``.
        eta: learning rate of Eq. 8-9 (the SPEC's 0.01).
        temperature: ``tau`` of the softmax re-weighting of the history (> 0).
        history: the most (features, outcome) pairs kept for the gradient.
        memory: long-term memory (duck-typed: ``record_transfer``, ``put``, ``get``);
            None keeps everything in an :class:`InProcessMemory`.
        name: key of the stored weights in ``memory``.
        min_latency_ms: floor on latencies before inverting them (ms, > 0).
    """

    def __init__(
        self,
        weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
        *,
        eta: float = 0.01,
        temperature: float = 0.1,
        history: int = 1000,
        memory: Any | None = None,
        name: str = "default",
        min_latency_ms: float = 1e-3,
    ) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.shape != (3,) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
            raise ValueError(
                f"weights must be three finite numbers >= 0, not all 0, got {list(weights)}"
            )
        if not (eta > 0 and math.isfinite(eta)):
            raise ValueError(f"eta must be a finite number > 0, got {eta!r}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be an integer >= 1, got {history!r}")
        if not min_latency_ms > 0:
            raise ValueError(f"min_latency_ms must be > 0, got {min_latency_ms!r}")
        self.memory = memory if memory is not None else InProcessMemory()
        self.name = name
        self.eta = float(eta)
        self.temperature = float(temperature)
        self.min_latency_ms = float(min_latency_ms)
        self._history: deque[tuple[np.ndarray, float]] = deque(maxlen=history)
        stored = self.memory.get("peer_selector", name)
        if stored is not None and len(stored.get("weights", ())) == 3:
            w = np.asarray(stored["weights"], dtype=np.float64)
            self._history.extend(_stored_history(stored.get("history", ())))
        self.weights = w
        self._unflushed: list[tuple[str, bool, float, int]] = []

    # ----- Eq. 7 ----------------------------------------------------------------------
    def scores(self, candidates: Mapping[Any, PeerFeatures]) -> dict[Any, float]:
        """Eq. 7 score of each reachable candidate with the current weights."""
        terms = normalised_terms(candidates, self.min_latency_ms)
        return {p: float(self.weights @ x) for p, x in terms.items()}

    def select(self, candidates: Mapping[Any, PeerFeatures], k: int) -> list[Any]:
        """The ``k`` best-scoring reachable candidates, best first (ties: smaller key first)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an integer >= 0, got {k!r}")
        scores = self.scores(candidates)
        return sorted(scores, key=lambda p: (-scores[p], p))[:k]

    # ----- Eq. 8-9 --------------------------------------------------------------------
    def record_outcome(
        self,
        peer: Any,
        features: np.ndarray,
        ok: bool,
        latency_ms: float,
        nbytes: int,
    ) -> None:
        """Remember one transfer with ``peer`` (normalised ``features`` when it was chosen);
        it reaches the memory at the next :meth:`flush`."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape != (3,):
            raise ValueError(f"features must have shape (3,), got {tuple(x.shape)}")
        self._history.append((x, 1.0 if ok else 0.0))
        self._unflushed.append((str(peer), bool(ok), float(latency_ms), int(nbytes)))

    def flush(self) -> None:
        """Write the outcomes recorded since the last flush to the memory
        (``record_transfer``); called by :meth:`update_weights`. Buffering keeps a
        database write off the per-step path."""
        pending, self._unflushed = self._unflushed, []
        for peer, ok, latency_ms, nbytes in pending:
            self.memory.record_transfer(peer, ok, latency_ms, nbytes)

    @property
    def history_size(self) -> int:
        """Number of (features, outcome) pairs available for the gradient."""
        return len(self._history)

    def success_rate(self, weights: np.ndarray | None = None) -> float:
        """The softmax-reweighted success rate of the history under ``weights``."""
        if not self._history:
            return float("nan")
        x, y = self._arrays()
        pi = self._policy(x, self.weights if weights is None else np.asarray(weights))
        return float(pi @ y)

    def success_rate_gradient(self) -> np.ndarray:
        """d success_rate / d w at the current weights (zeros without history)."""
        if not self._history:
            return np.zeros(3)
        x, y = self._arrays()
        pi = self._policy(x, self.weights)
        mean_x = pi @ x
        mean_y = pi @ y
        return (pi @ (x * y[:, None]) - mean_x * mean_y) / self.temperature

    def update_weights(self) -> np.ndarray:
        """One Eq. 8-9 step ``w <- max(w + eta * grad, 0)``; flushes the outcomes, saves
        and returns the weights."""
        self.flush()
        w = np.maximum(self.weights + self.eta * self.success_rate_gradient(), 0.0)
        if w.sum() > 0:
            self.weights = w
        self.memory.put(
            "peer_selector",
            self.name,
            {
                "weights": self.weights.tolist(),
                "history": [[*x.tolist(), y] for x, y in self._history],
            },
        )
        return self.weights.copy()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([h[0] for h in self._history])
        y = np.array([h[1] for h in self._history])
        return x, y

    def _policy(self, x: np.ndarray, weights: np.ndarray) -> np.ndarray:
        logits = x @ weights / self.temperature
        logits -= logits.max()
        e = np.exp(logits)
        return e / e.sum()
