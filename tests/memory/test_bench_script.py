"""scripts/bench_memory.py runs end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import REPO


@pytest.mark.slow
def test_bench_memory_quick_reports_every_measurement(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("SEDMA_POSTGRES_URL", None)  # the SQLite and STM rows; PostgreSQL is skipped
    proc = subprocess.run(
        [sys.executable, "scripts/bench_memory.py", "--quick", "--output", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PostgreSQL rows skipped" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [(r["backend"], r["measurement"].split(",")[0]) for r in rows] == [
        ("sqlite", "LTM write (record_lambda)"),
        ("sqlite", "LTM look-up"),
        ("sqlite", "LTM look-up"),
        ("in-process", "STM update (window 100 + EWMA)"),
    ]
    assert all(r["p50_us"] > 0 and r["p90_us"] >= r["p50_us"] for r in rows)
