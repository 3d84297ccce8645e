"""LongTermMemory behaviour, the same on SQLite and PostgreSQL (``store_url`` runs each test on
both; the PostgreSQL case is marked ``postgres``)."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from sedma_torch.memory import LongTermMemory, MemoryEntry, MemoryStoreError


class FakeClock:
    """Timestamps chosen by the test (unix seconds)."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _recent_mean_best(observations: list[tuple[float, float]], window: int = 8):
    """Reference of the recent-mean rule: over the last ``window`` (lam, error), the lam
    with the lowest mean error (a tie: the lam seen last); returns (lam, mean error)."""
    kept = observations[-window:]
    lams = np.array([lam for lam, _ in kept])
    errs = np.array([err for _, err in kept])
    best = None
    for lam in dict.fromkeys(lams.tolist()):
        mask = lams == lam
        last = int(np.flatnonzero(mask).max())
        cand = (float(errs[mask].mean()), -last, lam)
        best = cand if best is None or cand < best else best
    return best[2], best[0]


def test_best_lambda_is_the_recent_mean_best_per_material_and_workload(store_url):
    rng = np.random.default_rng(11)
    keys = [("taox_hfox", "dense_256"), ("taox_hfox", "sparse"), ("ag_asi", "dense_256")]
    grid = [0.0, 1e-2, 0.3, 2.0]  # few lambdas, so they repeat inside the window
    records = [
        (keys[rng.integers(3)], grid[rng.integers(4)], float(rng.uniform(0, 1))) for _ in range(60)
    ]
    with LongTermMemory(store_url) as ltm:
        for (material, workload), lam, err in records:
            ltm.record_lambda(material, workload, lam, err)
        for key in keys:
            mine = [(lam, err) for k, lam, err in records if k == key]
            assert len(mine) > 8  # the window matters
            best_lam, best_err = _recent_mean_best(mine)
            got_lam, got_err = ltm.best_lambda(*key)
            assert got_lam == best_lam and got_err == pytest.approx(best_err, rel=1e-12)
            entry = ltm.entry("lambda", key)
            assert entry.count == len(mine) and entry.score == pytest.approx(best_err, rel=1e-12)
            assert [tuple(o[:2]) for o in entry.value["recent"]] == mine[-8:]
            assert [o[2] for o in entry.value["recent"]] == list(
                range(len(mine) - 7, len(mine) + 1)
            )
            assert entry.created_at <= entry.updated_at
        assert ltm.best_lambda("taox_hfox", "never_seen") is None
        assert ltm.best_lambda("epiram", "dense_256") is None


def test_a_once_lucky_lambda_stops_winning_after_later_worse_observations(store_url):
    rng = np.random.default_rng(23)
    lucky, steady = float(rng.uniform(0.2, 0.5)), float(rng.uniform(1e-3, 1e-2))
    with LongTermMemory(store_url, lru_ttl_s=None) as ltm:
        ltm.record_lambda("m", "w", lucky, 1e-4)  # one lucky calibration
        later = [(steady, float(rng.uniform(0.01, 0.02))) for _ in range(2)]
        for lam, err in later:
            ltm.record_lambda("m", "w", lam, err)
        assert ltm.best_lambda("m", "w") == (lucky, 1e-4)  # still the best mean so far
        worse = [float(rng.uniform(0.05, 0.1)) for _ in range(2)]
        for err in worse:  # the lucky lambda, observed again, does worse
            ltm.record_lambda("m", "w", lucky, err)
        lam, err = ltm.best_lambda("m", "w")
        assert lam == steady
        assert err == pytest.approx(np.mean([e for _, e in later]), rel=1e-12)
        # the old rule (lowest error ever) would still answer the lucky record
        assert min([(1e-4, lucky), *[(e, s) for s, e in later]])[1] == lucky

    # never observed again, it is forgotten once lambda_window later records pushed it out
    with LongTermMemory(store_url, lambda_window=3, lru_ttl_s=None) as ltm:
        ltm.record_lambda("m", "v", lucky, 1e-4)
        errs = rng.uniform(0.01, 0.02, size=3).tolist()
        for i, e in enumerate(errs):
            ltm.record_lambda("m", "v", steady, e)
            if i < 2:
                assert ltm.best_lambda("m", "v")[0] == lucky
        assert ltm.best_lambda("m", "v") == (steady, pytest.approx(np.mean(errs), rel=1e-12))


def test_best_partition_is_the_cheapest_and_nested_json_round_trips(store_url):
    rng = np.random.default_rng(5)
    costs = rng.uniform(1, 10, size=12)
    partitions = [
        {"tile_rows": int(r), "tile_cols": int(c), "tiles": [[0, r], [r, 2 * r]], "name": f"p{i}"}
        for i, (r, c) in enumerate(rng.integers(16, 512, size=(12, 2)))
    ]
    with LongTermMemory(store_url) as ltm:
        for part, cost in zip(partitions, costs, strict=True):
            ltm.record_partition("conv3x3_dense", part, float(cost))
        assert ltm.best_partition("conv3x3_dense") == partitions[int(np.argmin(costs))]
        assert ltm.entry("partition", "conv3x3_dense").score == pytest.approx(costs.min())
        assert ltm.best_partition("other") is None


def test_returned_dicts_are_copies_that_cannot_corrupt_the_cache(store_url):
    with LongTermMemory(store_url) as ltm:
        ltm.record_partition("w", {"tiles": [1, 2]}, 1.0)
        ltm.put("misc", "k", {"a": {"b": 1}})
        got = ltm.best_partition("w")
        got["tiles"].append(3)
        ltm.get("misc", "k")["a"]["b"] = 99
        assert ltm.best_partition("w") == {"tiles": [1, 2]}
        assert ltm.get("misc", "k") == {"a": {"b": 1}}


def test_deployments_keep_the_best_placement_and_a_newest_first_history(store_url):
    rng = np.random.default_rng(8)
    perf = rng.uniform(50, 150, size=15)
    clock = FakeClock()
    with LongTermMemory(store_url, clock=clock) as ltm:
        for i, p in enumerate(perf):
            clock.now = 2_000.0 + i
            ltm.record_deployment("resnet18_4nodes", {"agent0": f"node{i % 4}", "i": i}, float(p))
        best = int(np.argmax(perf))
        assert ltm.best_deployment("resnet18_4nodes") == {
            "placement": {"agent0": f"node{best % 4}", "i": best},
            "performance": float(perf[best]),
        }
        history = ltm.deployment_history("resnet18_4nodes", limit=5)
        assert [h["placement"]["i"] for h in history] == [14, 13, 12, 11, 10]
        assert [h["performance"] for h in history] == [float(p) for p in perf[::-1][:5]]
        assert [h["created_at"] for h in history] == [2014.0, 2013.0, 2012.0, 2011.0, 2010.0]
        assert len(ltm.deployment_history("resnet18_4nodes")) == 15
        assert ltm.deployment_history("other") == []


def test_peer_profiles_match_numpy_aggregates_of_the_recorded_transfers(store_url):
    rng = np.random.default_rng(21)
    n = 60
    peers = rng.choice(["rank0", "rank1", "rank2"], size=n)
    ok = rng.random(n) < 0.7
    latency = rng.uniform(0.5, 80.0, size=n)
    nbytes = rng.integers(0, 10**9, size=n)
    clock = FakeClock()
    with LongTermMemory(store_url, clock=clock) as ltm:
        for i in range(n):
            clock.now = 5_000.0 + i
            ltm.record_transfer(str(peers[i]), bool(ok[i]), float(latency[i]), int(nbytes[i]))
        for peer in ("rank0", "rank1", "rank2"):
            m = peers == peer
            idx = np.flatnonzero(m)
            profile = ltm.peer_profile(peer)
            assert profile["peer"] == peer
            assert profile["attempts"] == m.sum()
            assert profile["successes"] == ok[m].sum()
            assert profile["success_rate"] == pytest.approx(ok[m].mean())
            assert profile["mean_latency_ms"] == pytest.approx(latency[m].mean(), rel=1e-12)
            assert profile["bytes"] == int(nbytes[m].sum())
            assert (profile["first_seen"], profile["last_seen"]) == (
                5000.0 + idx[0],
                5000.0 + idx[-1],
            )
            history = ltm.transfers(peer)
            assert [h["latency_ms"] for h in history] == latency[idx][::-1].tolist()
            assert [h["ok"] for h in history] == ok[idx][::-1].tolist()
            assert [h["nbytes"] for h in history] == nbytes[idx][::-1].tolist()
        newest = ltm.transfers(limit=7)
        assert [h["created_at"] for h in newest] == [5000.0 + i for i in range(n - 1, n - 8, -1)]
        assert [p["peer"] for p in ltm.peer_profiles()] == list(
            dict.fromkeys(str(p) for p in peers[::-1])
        )
        assert ltm.peer_profile("rank9") is None


def test_cache_stats_count_accesses_with_first_and_last_access_times(store_url):
    clock = FakeClock(100.0)
    with LongTermMemory(store_url, clock=clock) as ltm:
        for t, size in [(100.0, 4096), (160.0, 4096), (175.5, 8192)]:
            clock.now = t
            ltm.record_cache_access("sha256:abc", size)
        assert ltm.cache_stats("sha256:abc") == {
            "accesses": 3,
            "size_bytes": 8192,
            "first_access": 100.0,
            "last_access": 175.5,
        }
        assert ltm.cache_stats("sha256:none") is None


def test_put_replaces_the_value_and_counts_every_put(store_url):
    clock = FakeClock()
    with LongTermMemory(store_url, clock=clock) as ltm:
        ltm.put("workload_stats", "bert_base", {"calls": 1}, score=0.5)
        clock.now += 10
        ltm.put("workload_stats", "bert_base", {"calls": 2})
        assert ltm.get("workload_stats", "bert_base") == {"calls": 2}
        assert ltm.entry("workload_stats", "bert_base") == MemoryEntry(
            "workload_stats", "bert_base", {"calls": 2}, None, 2, 1000.0, 1010.0
        )
        clock.now += 5
        ltm.put("workload_stats", "gpt2", {"calls": 7})
        assert [e.key for e in ltm.entries("workload_stats")] == ["gpt2", "bert_base"]
        assert ltm.get("workload_stats", "missing") is None
        with pytest.raises(ValueError, match="record_lambda"):
            ltm.put("lambda", "x", {"lam": 1.0})


def test_eviction_at_capacity_removes_the_least_recently_updated_then_lowest_count(store_url):
    clock = FakeClock(0.0)
    with LongTermMemory(store_url, capacity=3, clock=clock) as ltm:

        def put(key: str, t: float) -> None:
            clock.now = t
            ltm.put("k", key, {"key": key})

        put("x0", 1)
        put("x1", 2)
        put("x2", 3)
        put("x0", 4)  # update: x0 is now the most recently updated
        assert ltm.get("k", "x1") == {"key": "x1"}  # cached in the LRU before it is evicted
        put("x3", 5)  # 4 rows > 3: the least recently updated (x1, t=2) goes
        assert ltm.get("k", "x1") is None
        assert {e.key for e in ltm.entries("k")} == {"x0", "x2", "x3"}
        put("x2", 6)
        put("x0", 6)  # x0 (count 3) and x2 (count 2) both updated at t=6; x3 at t=5
        put("x4", 7)  # evicts x3 (oldest update)
        assert {e.key for e in ltm.entries("k")} == {"x0", "x2", "x4"}
        put("x5", 8)  # x0 and x2 tie on t=6: the lower count (x2) goes
        assert {e.key for e in ltm.entries("k")} == {"x0", "x4", "x5"}
        assert ltm.entry("k", "x0").count == 3
        clock.now = 9  # every keyed record shares the pattern capacity
        ltm.record_lambda("taox_hfox", "dense", 0.1, 0.01)
        assert {e.key for e in ltm.entries("k")} == {"x4", "x5"}
        assert ltm.best_lambda("taox_hfox", "dense") == (0.1, 0.01)


def test_peer_and_cache_tables_evict_the_least_recently_seen_at_capacity(store_url):
    clock = FakeClock(0.0)
    with LongTermMemory(store_url, capacity=2, clock=clock) as ltm:
        for t, name in [(1, "a"), (2, "b"), (3, "a"), (4, "c")]:
            clock.now = t
            ltm.record_transfer(name, True, 1.0, 10)
            ltm.record_cache_access(name, 10)
        assert ltm.peer_profile("b") is None and ltm.cache_stats("b") is None
        assert ltm.peer_profile("a")["attempts"] == 2 and ltm.cache_stats("a")["accesses"] == 2
        assert ltm.peer_profile("c") is not None and ltm.cache_stats("c") is not None
        assert len(ltm.transfers(limit=100)) == 4  # the history is bounded separately


def test_histories_keep_only_the_newest_history_capacity_rows(store_url):
    with LongTermMemory(store_url, history_capacity=5) as ltm:
        for i in range(12):
            ltm.record_transfer("p", True, float(i), i)
            ltm.record_deployment("d", {"i": i}, float(i))
        assert [t["nbytes"] for t in ltm.transfers(limit=100)] == [11, 10, 9, 8, 7]
        assert [d["placement"]["i"] for d in ltm.deployment_history("d", 100)] == [11, 10, 9, 8, 7]
        assert ltm.peer_profile("p")["attempts"] == 12  # the profile counts every transfer


def test_own_writes_are_visible_at_once_through_the_lru(store_url):
    with LongTermMemory(store_url, lru_ttl_s=None) as ltm:
        assert ltm.best_lambda("m", "w") is None  # caches the miss
        ltm.record_lambda("m", "w", 0.5, 0.2)
        assert ltm.best_lambda("m", "w") == (0.5, 0.2)
        ltm.record_lambda("m", "w", 0.7, 0.1)
        assert ltm.best_lambda("m", "w") == (0.7, 0.1)
        assert ltm.cache_stats("c") is None
        ltm.record_cache_access("c", 5)
        assert ltm.cache_stats("c")["accesses"] == 1
        assert ltm.peer_profile("p") is None
        ltm.record_transfer("p", False, 3.0, 0)
        assert ltm.peer_profile("p")["successes"] == 0


def test_other_writers_are_seen_after_clear_cache_or_the_ttl(store_url):
    with (
        LongTermMemory(store_url, lru_ttl_s=None) as reader,
        LongTermMemory(store_url, lru_ttl_s=0.2) as ttl_reader,
        LongTermMemory(store_url, lru_size=0) as uncached,
        LongTermMemory(store_url) as writer,
    ):
        assert reader.best_lambda("m", "w") is None
        assert ttl_reader.best_lambda("m", "w") is None
        writer.record_lambda("m", "w", 0.3, 0.01)
        assert uncached.best_lambda("m", "w") == (0.3, 0.01)
        assert reader.best_lambda("m", "w") is None  # documented: cached until refreshed
        reader.clear_cache()
        assert reader.best_lambda("m", "w") == (0.3, 0.01)
        time.sleep(0.25)
        assert ttl_reader.best_lambda("m", "w") == (0.3, 0.01)


def test_reopening_keeps_every_record(store_url):
    with LongTermMemory(store_url) as ltm:
        ltm.record_lambda("alox_hfo2", "dense", 1e-3, 0.25)
        ltm.record_cache_access("cid", 7)
        assert ltm.schema_version == 2
    with LongTermMemory(store_url) as ltm:
        assert ltm.best_lambda("alox_hfo2", "dense") == (1e-3, 0.25)
        assert ltm.cache_stats("cid")["accesses"] == 1
    ltm.close()  # closing twice is harmless
    with pytest.raises(MemoryStoreError, match="closed"):
        ltm.best_lambda("x", "y")


INVALID = [
    ("record_lambda", ("m", "w", math.nan, 0.1), ValueError, "lam must be finite"),
    ("record_lambda", ("m", "w", 0.1, math.inf), ValueError, "error must be finite"),
    ("record_lambda", ("m", "w", -0.1, 0.1), ValueError, "lam must be >= 0"),
    ("record_lambda", ("m", "w", 0.1, -1.0), ValueError, "error must be >= 0"),
    ("record_lambda", ("", "w", 0.1, 0.1), ValueError, "material must be a non-empty"),
    ("record_lambda", ("m", "  ", 0.1, 0.1), ValueError, "workload must be a non-empty"),
    ("record_lambda", ("m", 3, 0.1, 0.1), TypeError, "workload must be a string"),
    ("record_lambda", ("m", "w", "0.1", 0.1), TypeError, "lam must be a real number"),
    ("record_partition", ("w", [1, 2], 1.0), TypeError, "partition must be a dict"),
    ("record_partition", ("w", {"a": math.nan}, 1.0), ValueError, "partition must be JSON"),
    ("record_partition", ("w", {"a": object()}, 1.0), ValueError, "partition must be JSON"),
    ("record_partition", ("w", {"a": 1}, math.nan), ValueError, "cost must be finite"),
    ("record_transfer", ("p", 1, 1.0, 10), TypeError, "ok must be a bool"),
    ("record_transfer", ("p", True, -1.0, 10), ValueError, "latency_ms must be >= 0"),
    ("record_transfer", ("p", True, 1.0, -10), ValueError, "nbytes must be >= 0"),
    ("record_transfer", ("p", True, 1.0, 1.5), TypeError, "nbytes must be an integer"),
    ("record_cache_access", ("c", -1), ValueError, "size_bytes must be >= 0"),
    ("record_cache_access", ("", 1), ValueError, "content_id must be a non-empty"),
    ("record_deployment", ("d", {"a": 1}, math.nan), ValueError, "performance must be finite"),
    ("record_deployment", ("d", "node0", 1.0), TypeError, "placement must be a dict"),
    ("put", ("", "k", {}), ValueError, "kind must be a non-empty"),
    ("put", ("kind", "", {}), ValueError, "key must be a non-empty"),
    ("put", ("kind", "k", {}, math.nan), ValueError, "score must be finite"),
    ("put", ("kind", "k" * 600, {}), ValueError, "at most 512 characters"),
    ("put", ("kind", "a\x1fb", {}), ValueError, "control character"),
]


def test_invalid_inputs_raise_clear_errors_and_store_nothing(store_url):
    with LongTermMemory(store_url) as ltm:
        for method, args, error, message in INVALID:
            with pytest.raises(error, match=message):
                getattr(ltm, method)(*args)
        for kind in ("lambda", "partition", "deployment", "kind"):
            assert ltm.entries(kind) == []
        assert ltm.transfers() == [] and ltm.peer_profiles() == []
        assert ltm.cache_stats("c") is None
        with pytest.raises(ValueError, match="material must be a non-empty"):
            ltm.best_lambda("", "w")
        with pytest.raises(ValueError, match="limit must be an integer >= 1"):
            ltm.transfers(limit=0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"capacity": 0}, "capacity must be an integer >= 1"),
        ({"lru_size": -1}, "lru_size must be an integer >= 0"),
        ({"history_capacity": 0}, "history_capacity"),
        ({"lambda_window": 0}, "lambda_window must be an integer >= 1"),
        ({"lru_ttl_s": math.nan}, "lru_ttl_s must be finite"),
    ],
)
def test_invalid_settings_are_rejected_before_touching_the_store(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LongTermMemory(tmp_path / "m.db", **kwargs)
    assert not (tmp_path / "m.db").exists()


def test_keys_cover_every_record_kind_independently(store_url):
    """The same name used as a workload, a peer, a content id and a pattern stays separate."""
    with LongTermMemory(store_url) as ltm:
        for name in itertools.repeat("shared", 2):
            ltm.record_partition(name, {"p": 1}, 1.0)
            ltm.record_transfer(name, True, 1.0, 1)
            ltm.record_cache_access(name, 1)
            ltm.record_deployment(name, {"d": 1}, 1.0)
            ltm.put("custom", name, {"c": 1})
        assert ltm.entry("partition", "shared").count == 2
        assert ltm.entry("deployment", "shared").count == 2
        assert ltm.entry("custom", "shared").count == 2
        assert ltm.peer_profile("shared")["attempts"] == 2
        assert ltm.cache_stats("shared")["accesses"] == 2
