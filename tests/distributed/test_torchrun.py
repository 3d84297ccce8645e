"""The exchange under ``torchrun``: a normal run, and a run in which a worker is killed.

torchrun's elastic agent stops every worker when one fails (and, with ``--max-restarts``,
restarts all of them); these tests check that a run under it averages correctly and that
a killed worker ends the job promptly, without a hang, with a failure exit code.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ..conftest import REPO
from .workers import step_tensor

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]

WORLD = 3
WORKER = REPO / "tests" / "distributed" / "torchrun_worker.py"


def _torchrun(out, steps: int, kill_rank: int, kill_step: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={WORLD}",
        "--max-restarts=0",
        str(WORKER),
        str(out),
        str(steps),
        str(kill_rank),
        str(kill_step),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_exchange_under_torchrun_equals_the_mean_on_every_rank(tmp_path):
    steps = 4
    proc = _torchrun(tmp_path, steps, -1, -1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = {
        r: torch.load(tmp_path / f"torchrun_rank{r}.pt", weights_only=False) for r in range(WORLD)
    }
    for step in range(steps):
        expected = np.mean([step_tensor(q, step).numpy() for q in range(WORLD)], axis=0)
        for r in range(WORLD):
            assert out[r]["participants"][step] == list(range(WORLD))
            np.testing.assert_allclose(out[r]["results"][step].numpy(), expected, rtol=1e-12)
            assert torch.equal(out[r]["results"][step], out[0]["results"][step])
    assert all(out[r]["finished"] == list(range(WORLD)) for r in range(WORLD))


def test_killed_worker_ends_the_torchrun_job_without_a_hang(tmp_path):
    kill_rank, kill_step, steps = 2, 3, 400  # the others would need >20 s to finish alone
    start = time.monotonic()
    proc = _torchrun(tmp_path, steps, kill_rank, kill_step)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "SIGKILL" in proc.stderr or "Signal 9" in proc.stderr, proc.stderr[-4000:]
    assert elapsed < 120
    out = {
        r: torch.load(tmp_path / f"torchrun_rank{r}.pt", weights_only=False) for r in range(WORLD)
    }
    assert len(out[kill_rank]["results"]) == kill_step  # it died at its step kill_step
    for r in (0, 1):
        assert "finished" not in out[r]  # stopped by the agent, not run to the end
        for step, got in enumerate(out[r]["results"][:kill_step]):
            expected = np.mean([step_tensor(q, step).numpy() for q in range(WORLD)], axis=0)
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)
