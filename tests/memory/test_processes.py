"""Several processes on one store: persistence across process restarts, concurrent writers,
a writer killed with SIGKILL mid-loop (SQLite, and PostgreSQL under the ``postgres`` mark)."""

from __future__ import annotations

import itertools
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from sedma_torch.memory import LongTermMemory

from ..conftest import REPO

FORK = mp.get_context("fork")  # the children need no fresh interpreter (no torch import)

WRITE_SCRIPT = """
import json, sys
from sedma_torch.memory import LongTermMemory
url, data = sys.argv[1], json.loads(sys.argv[2])
with LongTermMemory(url) as ltm:
    for lam, err in data["lambdas"]:
        ltm.record_lambda("taox_hfox", "dense_256", lam, err)
    ltm.record_partition("dense_256", data["partition"], data["cost"])
    for ok, latency, nbytes in data["transfers"]:
        ltm.record_transfer("rank1", ok, latency, nbytes)
    ltm.record_cache_access("sha256:feed", data["size"])
    ltm.record_deployment("mlp", {"agent0": "node1"}, data["performance"])
    ltm.put("notes", "run", {"seed": data["seed"]})
"""

READ_SCRIPT = """
import json, sys
from sedma_torch.memory import LongTermMemory
with LongTermMemory(sys.argv[1]) as ltm:
    print(json.dumps({
        "lambda": ltm.best_lambda("taox_hfox", "dense_256"),
        "partition": ltm.best_partition("dense_256"),
        "profile": ltm.peer_profile("rank1"),
        "cache": ltm.cache_stats("sha256:feed"),
        "deployment": ltm.best_deployment("mlp"),
        "notes": ltm.get("notes", "run"),
    }))
"""


def _python(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_records_persist_across_process_restarts(store_url):
    rng = np.random.default_rng(42)
    lambdas = rng.uniform(0, 1, size=(5, 2)).tolist()
    transfers = [(bool(rng.random() < 0.5), float(rng.uniform(1, 50)), int(n)) for n in range(6)]
    data = {
        "lambdas": lambdas,
        "partition": {"tiles": [[0, 128], [128, 256]], "crossbar": 128},
        "cost": 3.5,
        "transfers": transfers,
        "size": 12345,
        "performance": 98.5,
        "seed": 42,
    }
    _python(WRITE_SCRIPT, store_url, json.dumps(data))
    got = json.loads(_python(READ_SCRIPT, store_url))
    best = min(lambdas, key=lambda le: le[1])
    assert got["lambda"] == best
    assert got["partition"] == data["partition"]
    oks = [t[0] for t in transfers]
    assert got["profile"]["attempts"] == 6 and got["profile"]["successes"] == sum(oks)
    assert got["profile"]["mean_latency_ms"] == pytest.approx(np.mean([t[1] for t in transfers]))
    assert got["cache"]["accesses"] == 1 and got["cache"]["size_bytes"] == 12345
    assert got["deployment"] == {"placement": {"agent0": "node1"}, "performance": 98.5}
    assert got["notes"] == {"seed": 42}


def _writer(url: str, rank: int, n: int, barrier) -> None:
    ltm = LongTermMemory(url, busy_timeout_s=120)
    barrier.wait(timeout=120)
    for i in range(n):
        ltm.record_transfer("shared", i % 3 != 0, float(rank * 1000 + i), rank)
    ltm.close()


def test_four_concurrent_writers_lose_no_record(store_url):
    ranks, n = 4, 500
    barrier = FORK.Barrier(ranks)
    procs = [FORK.Process(target=_writer, args=(store_url, r, n, barrier)) for r in range(ranks)]
    for p in procs:  # the store does not exist yet: the writers also create it together
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * ranks
    expected_latency = sorted(float(r * 1000 + i) for r in range(ranks) for i in range(n))
    with LongTermMemory(store_url) as ltm:
        profile = ltm.peer_profile("shared")
        assert profile["attempts"] == ranks * n
        assert profile["successes"] == ranks * sum(i % 3 != 0 for i in range(n))
        assert profile["mean_latency_ms"] == pytest.approx(np.mean(expected_latency), rel=1e-12)
        assert profile["bytes"] == n * sum(range(ranks))
        rows = ltm.transfers("shared", limit=10 * ranks * n)
    assert sorted(r["latency_ms"] for r in rows) == expected_latency
    oldest_first = [int(r["nbytes"]) for r in reversed(rows)]  # nbytes = the writer's rank
    for rank in range(ranks):  # each writer's records appear in the order it wrote them
        mine = [r["latency_ms"] for r in reversed(rows) if r["nbytes"] == rank]
        assert mine == sorted(mine)
    switches = sum(a != b for a, b in itertools.pairwise(oldest_first))
    assert switches >= ranks, "the writers did not overlap: the test did not test concurrency"


def _lambda_writer(url: str, rank: int, n: int, barrier) -> None:
    ltm = LongTermMemory(url, busy_timeout_s=120, lambda_window=4 * n)
    barrier.wait(timeout=120)
    for i in range(n):
        ltm.record_lambda("taox_hfox", "dense_256", float(rank + 1), float(rank * 1000 + i))
    ltm.close()


def test_concurrent_lambda_writers_lose_no_observation(store_url):
    """record_lambda is a read-modify-write of the window: each record must see the last."""
    ranks, n = 4, 100
    with LongTermMemory(store_url):  # create the store first: the writers race on the row
        pass
    barrier = FORK.Barrier(ranks)
    procs = [
        FORK.Process(target=_lambda_writer, args=(store_url, r, n, barrier)) for r in range(ranks)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0] * ranks
    with LongTermMemory(store_url, lambda_window=ranks * n) as ltm:
        entry = ltm.entry("lambda", ("taox_hfox", "dense_256"))
        assert entry.count == ranks * n
        recent = entry.value["recent"]
        assert [o[2] for o in recent] == list(range(1, ranks * n + 1))
        assert sorted(o[1] for o in recent) == sorted(
            float(r * 1000 + i) for r in range(ranks) for i in range(n)
        )
        # rank 0 (lam 1.0) has the lowest mean error, whatever the interleaving
        assert ltm.best_lambda("taox_hfox", "dense_256") == (1.0, pytest.approx((n - 1) / 2))
    lams = [o[0] for o in recent]
    assert sum(a != b for a, b in itertools.pairwise(lams)) >= ranks, "writers did not overlap"


def _endless_writer(url: str, progress) -> None:
    ltm = LongTermMemory(url)
    i = 0
    while True:
        ltm.record_transfer("victim", True, float(i), i)
        ltm.put("k", f"key{i % 50}", {"i": i, "pad": "x" * 500})
        i += 1
        progress.value = i


def test_writer_killed_mid_loop_leaves_a_readable_consistent_store(store_url):
    acknowledged = 0
    for _ in range(3):
        progress = FORK.Value("q", 0)
        proc = FORK.Process(target=_endless_writer, args=(store_url, progress))
        proc.start()
        deadline = time.monotonic() + 120
        while progress.value < 60 and time.monotonic() < deadline and proc.is_alive():
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        assert progress.value >= 60
        acknowledged += progress.value
    if not store_url.startswith("postgresql"):
        con = sqlite3.connect(store_url)
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        con.close()
    with LongTermMemory(store_url) as ltm:
        rows = ltm.transfers("victim", limit=10**6)
        assert len(rows) >= acknowledged
        # the history row and the profile update of a transfer commit together or not at all
        assert ltm.peer_profile("victim")["attempts"] == len(rows)
        assert len(ltm.entries("k")) == 50
        ltm.record_transfer("victim", False, 1.0, 0)
        assert ltm.peer_profile("victim")["attempts"] == len(rows) + 1


def _use_inherited(ltm: LongTermMemory) -> None:
    ltm.record_cache_access("from_child", 3)
    assert ltm.cache_stats("from_child")["accesses"] == 1


def test_a_forked_child_can_use_an_inherited_store_without_breaking_the_parent(store_url):
    with LongTermMemory(store_url, lru_ttl_s=None) as ltm:
        ltm.record_cache_access("from_parent", 1)
        assert ltm.cache_stats("from_child") is None  # cached miss in the parent
        child = FORK.Process(target=_use_inherited, args=(ltm,))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == 0
        assert ltm.cache_stats("from_child") is None  # the parent's cache is its own
        ltm.clear_cache()
        assert ltm.cache_stats("from_child")["accesses"] == 1
        ltm.record_cache_access("from_parent", 1)
        assert ltm.cache_stats("from_parent")["accesses"] == 2
