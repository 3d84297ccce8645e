"""Fault injection on the long-term memory: writers killed with SIGKILL at random points.

A stronger version of ``tests/memory/test_processes.py::
test_writer_killed_mid_loop_leaves_a_readable_consistent_store`` (which kills after a fixed
number of loops and checks row counts): here the writer reports each record through a pipe
*after* its commit returned, the kill lands at a random point (a random number of
acknowledged records plus a random sub-millisecond-to-milliseconds delay, so also inside a
transaction), over several rounds on the same store, and every acknowledged record is
checked by identity and value, against the tables read with plain ``sqlite3`` as the
reference. A second test kills writers while they are creating a new store.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from sedma_torch.memory import LongTermMemory

from ..memory.test_processes import FORK

pytestmark = pytest.mark.faults

PUT, TRANSFER = 1, 2
ACK = struct.Struct("<qq")  # (kind, seq): 16 bytes, written atomically (< PIPE_BUF)


def _value(seq: int) -> dict:
    return {"seq": seq, "pad": "x" * (seq % 257)}


def _acking_writer(url: str, start: int, ack_fd: int) -> None:
    """Write records seq = start, start + 1, ... forever (a put for even seq, a transfer for
    odd), acknowledging each one on ``ack_fd`` after its commit returned."""
    ltm = LongTermMemory(url, busy_timeout_s=30)
    seq = start
    while True:
        if seq % 2 == 0:
            ltm.put("fault", f"s{seq}", _value(seq))
            os.write(ack_fd, ACK.pack(PUT, seq))
        else:
            ltm.record_transfer("victim", seq % 3 != 0, float(seq), seq)
            os.write(ack_fd, ACK.pack(TRANSFER, seq))
        seq += 1


def _run_and_kill(url: str, start: int, acks_before_kill: int, delay_s: float) -> list[int]:
    """Start a writer, SIGKILL it ``delay_s`` after its ``acks_before_kill``-th
    acknowledgement; return the acknowledged seqs (all of them, drained after the kill)."""
    r, w = os.pipe()
    proc = FORK.Process(target=_acking_writer, args=(url, start, w))
    proc.start()
    os.close(w)  # the child holds the only write end: EOF once it is dead
    buffer, acked = b"", []
    deadline = time.monotonic() + 30
    killed = False
    try:
        while True:
            if not killed and len(acked) >= acks_before_kill:
                time.sleep(delay_s)
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
            timeout = deadline - time.monotonic()
            assert timeout > 0, f"writer made {len(acked)} acknowledgements in 30 s"
            ready, _, _ = select.select([r], [], [], timeout)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            buffer += chunk
            n = len(buffer) // ACK.size * ACK.size
            acked += [seq for _, seq in ACK.iter_unpack(buffer[:n])]
            buffer = buffer[n:]
    finally:
        os.close(r)
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
    assert killed and proc.exitcode == -signal.SIGKILL
    assert buffer == b"", "an acknowledgement was cut in half"
    return acked


def _reference(path: Path) -> tuple[dict[int, dict], list[float], int]:
    """(puts by seq, transfer latencies, profile attempts) read with plain sqlite3, after
    checking the file's integrity."""
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        puts = {
            int(key[1:]): json.loads(value)
            for key, value in con.execute(
                "SELECT key, value FROM sedma_patterns WHERE kind = 'fault'"
            )
        }
        latencies = [
            row[0]
            for row in con.execute(
                "SELECT latency_ms FROM sedma_transfers WHERE peer = ?", ("victim",)
            )
        ]
        row = con.execute("SELECT transfers FROM sedma_peers WHERE peer = 'victim'").fetchone()
    finally:
        con.close()
    return puts, latencies, row[0] if row else 0


@pytest.mark.timeout(60)
def test_writer_killed_at_random_points_loses_no_committed_record(tmp_path):
    rng = np.random.default_rng(2016)
    path = tmp_path / "memory.db"
    url = str(path)
    acked: set[int] = set()
    in_flight: set[int] = set()  # committed-or-not seq of each kill: the one after the last ack
    start = 0
    for round_ in range(15):
        target = int(rng.integers(1, 120))
        delay_s = float(rng.choice([0.0, rng.uniform(0, 0.0005), rng.uniform(0, 0.005)]))
        got = _run_and_kill(url, start, target, delay_s)
        where = f"round {round_} (kill after {target} acks + {delay_s * 1e3:.2f} ms)"
        assert got == list(range(start, start + len(got))), where
        assert len(got) >= target, where
        acked |= set(got)
        in_flight.add(start + len(got))

        # the store opens without error and holds every acknowledged record, exactly
        puts, latencies, attempts = _reference(path)
        committed = set(puts) | {int(x) for x in latencies}
        assert acked <= committed, f"{where}: lost {sorted(acked - committed)[:10]}"
        assert committed - acked <= in_flight, f"{where}: records nobody wrote"
        assert all(puts[s] == _value(s) for s in puts), where
        assert len(latencies) == len(set(latencies)) == attempts, where  # row + profile: atomic
        with LongTermMemory(url, busy_timeout_s=5) as ltm:  # the lock did not die with it
            assert all(ltm.get("fault", f"s{s}") == _value(s) for s in acked if s % 2 == 0)
            rows = ltm.transfers("victim", limit=10**6)
            assert sorted(r["latency_ms"] for r in rows) == sorted(latencies)
            assert ltm.peer_profile("victim")["attempts"] == attempts
            assert len(ltm.entries("fault")) == len(puts)
        start = max(committed) + 1  # the next writer continues after what is stored

    # after the last kill a writer can continue and its records persist
    with LongTermMemory(url, busy_timeout_s=5) as ltm:
        ltm.put("fault", f"s{start}", _value(start))
        ltm.record_transfer("victim", True, float(start + 1), 1)
    puts, latencies, attempts = _reference(path)
    assert puts[start] == _value(start) and float(start + 1) in latencies
    assert attempts == len(latencies)
    assert len(acked) >= 6


def _creating_writer(url: str) -> None:
    with LongTermMemory(url) as ltm:
        ltm.record_cache_access("created", 1)
    while True:  # wait for the kill
        time.sleep(1)


@pytest.mark.timeout(60)
def test_writer_killed_while_creating_a_store_leaves_a_usable_path(tmp_path):
    """A store is linked into place complete, so a kill during creation leaves either no
    store or a whole one, never the 0-byte file that opening refuses."""
    rng = np.random.default_rng(7)
    outcomes = {"no store yet": 0, "store": 0}
    for round_ in range(30):
        path = tmp_path / f"memory{round_}.db"
        proc = FORK.Process(target=_creating_writer, args=(str(path),))
        proc.start()
        time.sleep(float(rng.uniform(0, 0.02)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=30)
        assert proc.exitcode == -signal.SIGKILL
        if path.exists():
            outcomes["store"] += 1
            assert path.stat().st_size > 0, f"round {round_}: an empty store file was left"
            assert path.read_bytes()[:16] == b"SQLite format 3\x00"
        else:
            outcomes["no store yet"] += 1
        with LongTermMemory(path, busy_timeout_s=5) as ltm:
            ltm.record_cache_access("after", 1)
        with LongTermMemory(path) as ltm:
            assert ltm.cache_stats("after")["accesses"] == 1
    assert sum(outcomes.values()) == 30
