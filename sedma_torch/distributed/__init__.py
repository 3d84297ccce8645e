"""Layer 2: memory-aware communication.

* :mod:`~sedma_torch.distributed.telemetry`: availability, free memory, RTT per rank.
* :mod:`~sedma_torch.distributed.selection`: Eq. 7 peer scores, Eq. 8-9 weight adaptation.
* :mod:`~sedma_torch.distributed.exchange`: deadline-bounded gradient exchange with the
  selected peers over torch.distributed (gloo): a DDP comm hook and a group wrapper.
* :mod:`~sedma_torch.distributed.cache`: utility cache (Eq. 10) in front of fetches.
* :mod:`~sedma_torch.distributed.p2p`: content-addressed tensors over Lattica (DHT, BitSwap).
* :mod:`~sedma_torch.distributed.launch`: a launcher whose workers outlive a dead peer.
"""

from .cache import CacheStats, UtilityCache
from .exchange import (
    ExchangeConfig,
    ExchangeStats,
    MemoryAwareGroup,
    PeerExchange,
    memory_aware_hook,
    register_memory_aware_hook,
    schedule_from_view,
)
from .launch import LaunchResult, RankOutcome, launch, spawn
from .local_memory import InProcessMemory
from .p2p import PayloadRejected, TensorPeer, content_id
from .selection import PeerFeatures, PeerSelector, normalised_terms
from .telemetry import Telemetry, measure_local

__all__ = [
    "CacheStats",
    "ExchangeConfig",
    "ExchangeStats",
    "InProcessMemory",
    "LaunchResult",
    "MemoryAwareGroup",
    "PayloadRejected",
    "PeerExchange",
    "PeerFeatures",
    "PeerSelector",
    "RankOutcome",
    "Telemetry",
    "TensorPeer",
    "UtilityCache",
    "content_id",
    "launch",
    "measure_local",
    "memory_aware_hook",
    "normalised_terms",
    "register_memory_aware_hook",
    "schedule_from_view",
    "spawn",
]
