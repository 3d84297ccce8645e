"""UtilityCache (Eq. 10): utilities, eviction order and hit rate against brute force."""

from __future__ import annotations

import array
import gc
import math
import re
import weakref

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


# --------------------------------------------------------------------------- issue 16 item 8


def _held_storage_bytes(cache: UtilityCache) -> int:
    """Bytes of the distinct storages (or bytes objects) the cache keeps alive, read from
    the objects themselves (an independent reference for ``used_bytes``)."""
    seen: dict[int, int] = {}
    for value, _ in cache._items.values():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        else:
            seen[id(value)] = memoryview(value).nbytes
    return sum(seen.values())


def test_views_of_large_tensors_do_not_keep_their_storage_alive():
    """Item 8a: 20 one-element views of 50 MB tensors in a 1 MB cache. The cache must hold
    (and count) 20 * 4 bytes, and the 50 MB buffers must be freed once the caller drops
    them (checked with weak references to the NumPy arrays that own the buffers)."""
    cache = UtilityCache(1.0)
    refs = []
    for i in range(20):
        owner = np.empty(12_500_000, dtype=np.float32)  # 50 MB, pages never touched
        owner[i] = float(i)
        refs.append(weakref.ref(owner))
        big = torch.from_numpy(owner)  # shares the buffer: the storage keeps `owner` alive
        assert big.untyped_storage().nbytes() == 50_000_000
        assert cache.put(f"v{i}", big[i : i + 1])
        del owner, big
    gc.collect()
    assert [r() is None for r in refs] == [True] * 20, "the cache keeps 50 MB buffers alive"
    assert len(cache) == 20
    assert cache.used_bytes == 20 * 4 == _held_storage_bytes(cache)
    assert [cache.get(f"v{i}").tolist() for i in range(20)] == [[float(i)] for i in range(20)]


def test_used_bytes_is_what_the_cache_holds_for_slices_and_expanded_tensors():
    base = torch.arange(1000, dtype=torch.float64)
    cache = UtilityCache(1.0)
    cache.put("slice", base[100:200:2])  # 50 elements, strided view of an 8 kB storage
    cache.put("col", base.view(100, 10)[:, 3])  # 100 elements
    cache.put("expanded", torch.ones(1).expand(1000))  # 1 element stored, 1000 visible
    assert cache.used_bytes == 8 * 50 + 8 * 100 + 4 * 1000 == _held_storage_bytes(cache)
    assert torch.equal(cache.get("slice"), base[100:200:2])
    assert torch.equal(cache.get("col"), base.view(100, 10)[:, 3])
    assert torch.equal(cache.get("expanded"), torch.ones(1000))


def test_memoryviews_are_counted_in_bytes_not_items():
    """Item 8b: len() of a memoryview counts items (of its first dimension), not bytes."""
    doubles = memoryview(array.array("d", range(1000)))  # 1000 items of 8 bytes
    matrix = memoryview(np.zeros((10, 100), dtype=np.float32))  # len 10, 4000 bytes
    assert len(doubles) == 1000 and len(matrix) == 10
    cache = UtilityCache(1.0)
    cache.put("d", doubles)
    cache.put("m", matrix)
    assert cache.used_bytes == 8000 + 4000 == _held_storage_bytes(cache)
    assert cache.get("d") == array.array("d", range(1000)).tobytes()
    assert cache.memory.cache_stats("d")["size_bytes"] == 8000
    # the capacity is enforced in bytes: 125,001 doubles (1,000,008 bytes) > 1 MB
    assert not cache.put("too_big", memoryview(array.array("d", bytes(8 * 125_001))))
    assert cache.stats.rejected == 1 and "too_big" not in cache


def test_cached_values_do_not_alias_the_callers_objects():
    """Item 8c: copy-in (a later change of the caller's object does not reach the cache)
    and copy-out (changing what get returned does not change the cache)."""
    cache = UtilityCache(1.0)
    t = torch.arange(4.0, requires_grad=True)
    cache.put("t", t)
    with torch.no_grad():
        t[0] = 100.0
    got = cache.get("t")
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0] and not got.requires_grad
    got[1] = -1.0
    assert cache.get("t").tolist() == [0.0, 1.0, 2.0, 3.0]
    assert cache.get("t").data_ptr() != cache.get("t").data_ptr()

    raw = bytearray(b"abc")
    view = memoryview(raw)
    cache.put("ba", raw)
    cache.put("mv", view)
    raw[0] = ord("z")
    assert cache.get("ba") == b"abc" and cache.get("mv") == b"abc"
    assert isinstance(cache.get("ba"), bytes)  # immutable: nothing to change in place
    view.release()


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"capacity_mb": True}, TypeError, "capacity_mb must be a real number > 0, got bool"),
        ({"capacity_mb": False}, TypeError, "capacity_mb must be a real number > 0, got bool"),
        ({"capacity_mb": "1"}, TypeError, "capacity_mb must be a real number > 0, got str"),
        ({"capacity_mb": None}, TypeError, "capacity_mb must be a real number"),
        ({"capacity_mb": math.nan}, ValueError, "capacity_mb must be a finite number > 0"),
        ({"capacity_mb": math.inf}, ValueError, "capacity_mb must be a finite number > 0"),
        ({"capacity_mb": -1.0}, ValueError, "capacity_mb must be a finite number > 0"),
        ({"capacity_mb": 1e-9}, ValueError, "capacity_mb must be at least 1e-6"),
        ({"recency_decay_s": True}, TypeError, "recency_decay_s must be a real number"),
        ({"recency_decay_s": math.nan}, ValueError, "recency_decay_s must be a finite"),
        ({"min_window_s": True}, TypeError, "min_window_s must be a real number"),
        ({"min_window_s": -math.inf}, ValueError, "min_window_s must be a finite"),
        ({"clock": 5.0}, TypeError, "clock must be callable"),
        ({"memory": object()}, TypeError, "memory must provide record_cache_access and"),
    ],
)
def test_constructor_rejects_bools_nan_and_non_numbers_naming_the_argument(kwargs, error, message):
    """Item 8d: bool is an int in Python; UtilityCache(True) used to build a 1 MB cache."""
    kwargs = {"capacity_mb": 1.0, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        UtilityCache(**kwargs)


def test_numpy_and_integer_capacities_are_accepted():
    assert UtilityCache(np.float64(0.5)).capacity_bytes == 500_000
    assert UtilityCache(np.int64(2)).capacity_bytes == 2_000_000
    assert UtilityCache(3).capacity_bytes == 3_000_000


def test_sparse_tensors_are_refused_naming_the_layout():
    with pytest.raises(TypeError, match=re.escape("dense (strided) tensors, got torch.sparse_coo")):
        UtilityCache(1.0).put("s", torch.eye(3).to_sparse())
