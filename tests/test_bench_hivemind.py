"""``scripts/bench_hivemind.py``: hivemind vs ``train.py distributed=p2p``. The helpers that
turn logs and ``ss`` samples into the table's columns are checked here with any Python;
the end-to-end run needs a Python with ``hivemind`` (``$SEDMA_HIVEMIND_PYTHON``, or this
one) and is slow (`pytest -m slow`); it skips without one."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def _load():
    spec = importlib.util.spec_from_file_location(
        "bench_hivemind", REPO / "scripts" / "bench_hivemind.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hivemind_python() -> str | None:
    for python in (os.environ.get("SEDMA_HIVEMIND_PYTHON"), sys.executable):
        if not python:
            continue
        try:
            ok = subprocess.run(
                [python, "-c", "import hivemind"], capture_output=True, timeout=120
            ).returncode
        except (OSError, subprocess.TimeoutExpired):
            continue
        if ok == 0:
            return python
    return None


def test_time_to_target_waits_for_every_peer():
    bench = _load()
    curves = {"peer0": [(10.0, 2.0), (11.0, 0.4), (12.0, 0.6)], "peer1": [(9.0, 1.0), (13.0, 0.3)]}
    got = bench.time_to_target(curves, 0.5)
    assert got["per_peer_s"] == {"peer0": 11.0, "peer1": 13.0}
    assert got["all_peers_s"] == 13.0 and got["first_window_s"] == 9.0
    assert got["from_first_window_s"] == 4.0
    never = bench.time_to_target({"peer0": [(1.0, 0.4)], "peer1": [(1.0, 0.9)]}, 0.5)
    assert never["all_peers_s"] is None and never["from_first_window_s"] is None


def test_kill_effect_splits_intervals_at_the_kill():
    bench = _load()
    run = {
        "peers_n": 2,
        "killed_at_s": 3.5,
        "peers": {
            "peer0": {"curve": [(1, 1.0), (2, 0.9), (3, 0.8), (13, 0.7), (14, 0.6)], "top1": 0.9},
            "peer1": {"curve": [(1, 1.0), (2, 0.9), (3, 0.8)], "top1": None},
        },
    }
    effect = bench.kill_effect(run)
    assert set(effect) == {"peer0"}  # the killed peer is not a survivor
    assert effect["peer0"]["median_interval_before_s"] == 1
    assert effect["peer0"]["max_gap_after_s"] == 10 and effect["peer0"]["finished"]


def test_ss_sample_attributes_sockets_to_peers_and_keeps_the_max():
    bench = _load()
    meter = bench.SocketBytes()
    meter.track(100, "peer0")
    owner = {100: "peer0", 101: "peer0"}  # 101: a child (hivemind's p2pd)
    first = (
        'ESTAB 0 0 127.0.0.1:4001 127.0.0.1:5001 users:(("p2pd",pid=101,fd=9))\n'
        "\t cubic bytes_sent:1000 bytes_acked:1001 bytes_received:50\n"
        'ESTAB 0 0 127.0.0.1:4002 127.0.0.1:5002 users:(("other",pid=999,fd=3))\n'
        "\t cubic bytes_sent:77777\n"
    )
    meter.parse(first, owner)
    meter.parse(first.replace("bytes_sent:1000", "bytes_sent:2500"), owner)
    meter.parse(first.replace("bytes_sent:1000", "bytes_sent:10"), owner)  # never goes down
    assert meter.finish() == {"peer0": {"sent": 2500, "received": 50, "sockets": 1}}


def test_round_lines_of_our_peers_are_parsed():
    bench = _load()
    m = bench.LINE.search("p2p peer -1: round 12 loss 0.0423 averaged with 2 of 2 (0.31 s)")
    assert m and m.groups() == ("-1", "12", "0.0423")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_hivemind_base_runs_end_to_end(tmp_path):
    python = _hivemind_python()
    if python is None:
        pytest.skip("no Python with hivemind (set SEDMA_HIVEMIND_PYTHON)")
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [python, "scripts/bench_hivemind.py", "--only", "base", "--rounds", "6",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=850,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for name in ("hivemind/base", "ours/base"):
        peers = result[name]["peers"]
        assert len(peers) == 3, result[name]
        assert all(p["top1"] is not None and p["top1"] > 0.5 for p in peers.values())
        assert all(p["bytes"] and p["bytes"]["sent"] > 0 for p in peers.values())
