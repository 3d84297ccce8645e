"""scripts/bench_placement.py runs end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_placement_adaptation_and_resilience_sections_run():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/bench_placement.py",
            "--sections",
            "adaptation",
            "resilience",
            "--adapt-runs",
            "1",
            "--seeds",
            "0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### Adaptation" in proc.stdout and "### Resilience" in proc.stdout
    resilience = proc.stdout.split("### Resilience")[1]
    row = next(line for line in resilience.splitlines() if line.startswith("| 0 |"))
    assert "| 0 % |" in row  # not re-placed: Pods pinned to the dead node stay Pending
