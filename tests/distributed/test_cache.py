"""UtilityCache (Eq. 10): utilities, eviction order and hit rate against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sedma_torch.distributed import InProcessMemory, UtilityCache


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _eq10(accesses, first, last, size_bytes, now, decay_s=600.0, min_window_s=60.0):
    per_hour = accesses / (max(now - first, min_window_s) / 3600.0)
    return per_hour * math.exp(-(now - last) / decay_s) / (size_bytes / 1e6)


def test_utility_matches_eq10_by_hand():
    clock = FakeClock()
    cache = UtilityCache(10.0, clock=clock)
    t0 = clock.t
    cache.put("x", torch.zeros(250_000))  # 1 MB, first access at t0
    clock.t += 1800
    assert cache.get("x") is not None
    clock.t += 300
    # 2 accesses over 2100 s = 3.4286 /h; recency exp(-300/600); 1 MB
    expected = 2 / (2100 / 3600) * math.exp(-0.5) / 1.0
    assert cache.utility("x") == pytest.approx(expected, rel=1e-12)
    assert cache.utility("x") == pytest.approx(_eq10(2, t0, t0 + 1800, 1e6, clock.t))
    assert cache.utility("never-seen") == 0.0


def test_eviction_order_matches_brute_force_utility_ranking():
    rng = np.random.default_rng(11)
    clock = FakeClock()
    memory = InProcessMemory(clock=clock)
    cache = UtilityCache(capacity_mb=2.0, memory=memory, clock=clock)
    sizes = {f"t{i}": int(s) for i, s in enumerate(rng.integers(20_000, 60_000, 12) * 4)}
    log: dict[str, list[float]] = {k: [] for k in sizes}
    for key, size in sizes.items():  # insert all, then access at random times
        clock.t += float(rng.uniform(1, 30))
        cache.put(key, torch.zeros(size // 4))
        log[key].append(clock.t)
    for _ in range(40):
        clock.t += float(rng.uniform(1, 120))
        key = str(rng.choice(list(sizes)))
        assert cache.get(key) is not None
        log[key].append(clock.t)
    now = clock.t
    brute = sorted(sizes, key=lambda k: _eq10(len(log[k]), log[k][0], log[k][-1], sizes[k], now))
    assert cache.eviction_order() == brute
    # a 1 MB insertion evicts the shortest lowest-utility prefix that makes room
    used = sum(sizes.values())
    need = used + 1_000_000 - cache.capacity_bytes
    expected_evicted, freed = [], 0
    for key in brute:
        if freed >= need:
            break
        expected_evicted.append(key)
        freed += sizes[key]
    assert cache.put("big", torch.zeros(250_000))
    assert [k for k in sizes if k not in cache] == sorted(
        expected_evicted, key=lambda k: list(sizes).index(k)
    )
    assert cache.stats.evictions == len(expected_evicted)
    assert cache.used_bytes <= cache.capacity_bytes


def test_hit_rate_and_oversize_rejection():
    cache = UtilityCache(1.0)
    assert cache.get("a", size_bytes=400) is None  # miss
    cache.put("a", b"x" * 400)
    for _ in range(3):
        assert cache.get("a") == b"x" * 400
    assert cache.get("b") is None
    assert cache.stats.hits == 3 and cache.stats.misses == 2
    assert cache.stats.hit_rate == pytest.approx(3 / 5)
    assert not cache.put("huge", torch.zeros(300_000))  # 1.2 MB > 1 MB
    assert "huge" not in cache and cache.stats.rejected == 1
    # the miss and the 3 hits; the put adds none (the miss already recorded the item)
    assert cache.memory.cache_stats("a")["accesses"] == 4


def test_cache_rejects_bad_arguments():
    with pytest.raises(ValueError, match="capacity_mb"):
        UtilityCache(0)
    with pytest.raises(TypeError, match="tensors or bytes"):
        UtilityCache(1.0).put("a", [1, 2, 3])
