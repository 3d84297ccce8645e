"""Per-rank telemetry: availability, free memory, round-trip latency to each peer.

* availability: idle fraction of the host's CPU cores since the previous measurement
  (``psutil.cpu_percent``), or ``1 - utilisation`` of the rank's GPU when it has one and
  ``torch.cuda.utilization`` works (needs NVML). Ranks that share one host see the same
  CPU value.
* free memory: host memory available to new processes (``psutil.virtual_memory``), and
  the device's free memory (``torch.cuda.mem_get_info``) on a GPU.
* round-trip latency: measured by :class:`sedma_torch.distributed.PeerExchange` with a
  ping-pong over the process group at every telemetry refresh (every ``refresh_every``
  steps). A peer that is busy answers when it reaches the refresh point, so its RTT
  includes its lateness: that is the latency a gradient exchange with it would see.
* local step time: the median wall time of the rank's recent steps *outside* the exchange
  (compute, data loading), used to decide whether a late rank is worth waiting for.

Rows travel between ranks as JSON (never pickle) and are validated on receipt.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass

import psutil
import torch

__all__ = ["Telemetry", "measure_local"]


@dataclass(frozen=True)
class Telemetry:
    """One rank's published measurements.

    Attributes:
        rank: the publishing rank.
        availability: idle CPU (or GPU) fraction in [0, 1].
        host_free_gb: free host memory in GB (1e9 bytes).
        device_free_gb: free device memory in GB, or None without a GPU.
        rtt_ms: round-trip time in ms to every rank (own entry 0; ``inf`` = no answer).
        weights: the rank's current Eq. 7 weights (w1, w2, w3).
        step: the training step at which it was measured.
        timestamp: unix time of the measurement (s).
        compute_ms: median local step time (ms) since the previous refresh, excluding the
            time spent in the exchange; None before the first measured step.
        collective_gen: the generation of collective subgroup the rank trusts (raised
            after a failed collective, so that a broken group is never reused).
    """

    rank: int
    availability: float
    host_free_gb: float
    device_free_gb: float | None
    rtt_ms: tuple[float, ...]
    weights: tuple[float, float, float]
    step: int
    timestamp: float
    compute_ms: float | None = None
    collective_gen: int = 0

    @property
    def mem_free_gb(self) -> float:
        """The free memory the selector uses: the device's on a GPU, else the host's."""
        return self.device_free_gb if self.device_free_gb is not None else self.host_free_gb

    def to_bytes(self) -> bytes:
        """JSON encoding (``inf`` RTTs written as null)."""
        d = asdict(self)
        d["rtt_ms"] = [r if math.isfinite(r) else None for r in self.rtt_ms]
        return json.dumps(d, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, world_size: int) -> Telemetry:
        """Decode and validate a row; raises ValueError naming the bad field."""
        try:
            d = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"telemetry row is not valid JSON: {exc}") from exc
        if not isinstance(d, dict) or set(d) != set(cls.__dataclass_fields__):
            raise ValueError(f"telemetry row must have fields {sorted(cls.__dataclass_fields__)}")
        rtt = d["rtt_ms"]
        if not isinstance(rtt, list) or len(rtt) != world_size:
            raise ValueError(f"telemetry rtt_ms must list {world_size} values, got {rtt!r}")
        rtt_t = tuple(math.inf if r is None else float(r) for r in rtt)
        if any(math.isnan(r) or r < 0 for r in rtt_t):
            raise ValueError(f"telemetry rtt_ms must be >= 0, got {rtt!r}")
        rank = d["rank"]
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"telemetry rank must be in [0, {world_size}), got {rank!r}")
        weights = tuple(float(w) for w in d["weights"])
        if len(weights) != 3 or any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f"telemetry weights must be three numbers >= 0, got {weights}")
        availability = float(d["availability"])
        if not 0.0 <= availability <= 1.0:
            raise ValueError(f"telemetry availability must be in [0, 1], got {availability}")
        host = float(d["host_free_gb"])
        device = None if d["device_free_gb"] is None else float(d["device_free_gb"])
        if host < 0 or (device is not None and device < 0):
            raise ValueError("telemetry free memory must be >= 0")
        compute = None if d["compute_ms"] is None else float(d["compute_ms"])
        if compute is not None and not (math.isfinite(compute) and compute >= 0):
            raise ValueError(f"telemetry compute_ms must be a number >= 0, got {compute}")
        gen = d["collective_gen"]
        if isinstance(gen, bool) or not isinstance(gen, int) or gen < 0:
            raise ValueError(f"telemetry collective_gen must be an integer >= 0, got {gen!r}")
        return cls(
            rank=rank,
            availability=availability,
            host_free_gb=host,
            device_free_gb=device,
            rtt_ms=rtt_t,
            weights=weights,  # type: ignore[arg-type]
            step=int(d["step"]),
            timestamp=float(d["timestamp"]),
            compute_ms=compute,
            collective_gen=gen,
        )


def measure_local(device: torch.device | None = None) -> tuple[float, float, float | None]:
    """(availability, host_free_gb, device_free_gb) of this process's host and device.

    ``availability`` is the idle CPU fraction since the previous call (the first call in a
    process measures over 50 ms), or ``1 - GPU utilisation`` on a CUDA device with NVML.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    host_free_gb = psutil.virtual_memory().available / 1e9
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        try:
            availability = 1.0 - torch.cuda.utilization(device) / 100.0
        except Exception:  # NVML missing: fall back to the host's CPU
            availability = _cpu_idle()
        return min(max(availability, 0.0), 1.0), host_free_gb, free / 1e9
    return _cpu_idle(), host_free_gb, None


_cpu_primed = False


def _cpu_idle() -> float:
    global _cpu_primed
    if not _cpu_primed:
        psutil.cpu_percent(interval=None)
        time.sleep(0.05)
        _cpu_primed = True
    return min(max(1.0 - psutil.cpu_percent(interval=None) / 100.0, 0.0), 1.0)
