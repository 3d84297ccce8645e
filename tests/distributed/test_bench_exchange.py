"""scripts/bench_exchange.py runs end to end on a tiny gradient (slow)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(900)
def test_bench_exchange_tiny_run_reports_every_scenario(tmp_path):
    args = [
        "scripts/bench_exchange.py",
        *("--params", "20000", "--steps", "6", "--warmup-steps", "2", "--refresh-every", "2"),
        *("--compute-ms", "20", "--readmit-wait-s", "1"),
        *("--deadline-ms", "3000", "--refresh-deadline-s", "3", "--out", str(tmp_path)),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=850
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = json.loads((tmp_path / "bench_exchange.json").read_text())["table"]
    assert {(r["scenario"], r["method"]) for r in table} == {
        (s, m)
        for s in ("homogeneous", "slow_compute", "slow_link")
        for m in ("allreduce", "memory_aware", "memory_aware_k2")
    }
    for row in table:
        assert row["fast_step_ms"] > 0 and row["bytes_per_step_MB"] > 0
        if row["method"] != "allreduce":
            assert row["views"] == 3 and 0 <= row["straggler_in_views"] <= 3
        if row["method"] == "memory_aware_k2" and row["straggler_in_views"] == 3:
            # 3 views of 4 members, each picking 2 of its 3 peers: 24 of 36 possible picks
            # (27 of them on the 3 other ranks, 9 on the straggler)
            picks = row["others_selected"] * 27 + row["straggler_selected"] * 9
            assert picks == pytest.approx(24)
    assert (tmp_path / "bench_exchange.png").stat().st_size > 0
