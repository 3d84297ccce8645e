"""A rank of ``train.py distributed=memory_aware`` killed (SIGKILL) or stopped (SIGSTOP).

Real runs: ``python train.py`` with 3 spawned gloo ranks, and a real signal sent to one
rank's process when rank 0 prints the first epoch of a phase (the driver is
``scripts/bench_faults.py``, which prints the same drills as a table). Every drill checks
that the job exits within a bounded time of the fault (no hang), with the survivors'
results written, and that the lost rank is reported: on stderr, in results.json
(``distributed.failed_ranks``, ``distributed.ranks``), and in the members of the phases.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from ..conftest import REPO

pytestmark = [pytest.mark.faults, pytest.mark.distributed]

BOUND_S = 60.0
"""Longest accepted time from the fault to train.py's exit (measured: 2-10 s)."""
ROWS = ["digital", "hwa:digital", "hwa:taox_hfox/none"]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_faults", REPO / "scripts" / "bench_faults.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_faults", module)
    spec.loader.exec_module(module)
    return module


bench = _bench()


def _describe(run) -> str:
    return (
        f"exit {run.returncode}, hung {run.hung}, {run.fault_to_exit_s} s after the fault\n"
        f"--- stdout\n{run.stdout[-3000:]}\n--- stderr\n{run.stderr[-4000:]}"
    )


def _check_survived(run, phase: str, fault: str, victim: int) -> None:
    info = _describe(run)
    assert not run.hung, info
    assert run.returncode == 0, info
    assert run.fault_to_exit_s < BOUND_S, info
    assert not run.victim_left, "the faulted rank was left running: " + info
    assert run.results is not None, "no results.json: " + info
    assert [r["label"] for r in run.results["rows"]] == ROWS
    section = run.results["distributed"]
    survivors = [r for r in range(3) if r != victim]
    # the launcher's record: who died, and how
    assert section["failed_ranks"] == [victim], section
    ranks = {r["rank"]: r for r in section["ranks"]}
    assert all(ranks[r]["status"] == "ok" and ranks[r]["exit_code"] == 0 for r in survivors)
    lost = ranks[victim]
    assert lost["pid"] == run.victim_pid
    if fault == "kill":
        assert lost["status"] == "signalled" and lost["exit_code"] == -9, lost
        assert "SIGKILL" in lost["detail"]
    else:  # stopped: killed by the launcher once the survivors had finished
        assert lost["status"] == "unresponsive" and lost["exit_code"] is None, lost
        assert "stopped" in lost["detail"]
    assert f"lost rank {victim}:" in run.stderr, info
    assert f"rank {victim} (pid {run.victim_pid})" in run.stdout, info
    # the fault hit the intended phase, and rank 0 knew whom it lost
    members = {p["phase"]: p["members"] for p in section["phases"]}
    assert members["digital"] == [0, 1, 2]
    if phase == "digital":
        assert members["hwa"] == survivors, section["phases"]
    else:
        assert members["hwa"] == [0, 1, 2], section["phases"]
    assert victim in [r["rank"] for r in section["lost_ranks"]], section["lost_ranks"]
    assert section["members"] == (survivors if phase == "digital" else [0, 1, 2])


CASES = [
    pytest.param("digital", "kill", 1, id="digital-kill"),
    pytest.param("hwa", "stop", 2, id="hwa-stop"),
    pytest.param("digital", "stop", 1, id="digital-stop", marks=pytest.mark.slow),
    pytest.param("hwa", "kill", 2, id="hwa-kill", marks=pytest.mark.slow),
]


@pytest.mark.timeout(420)
@pytest.mark.parametrize(("phase", "fault", "victim"), CASES)
def test_survivors_finish_and_report_the_lost_rank(tmp_path, phase, fault, victim):
    run = bench.run_fault(tmp_path, phase, fault, victim, exit_timeout=BOUND_S + 60)
    _check_survived(run, phase, fault, victim)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_stopped_rank0_fails_the_job_in_bounded_time(tmp_path):
    """Rank 0 writes the results: stopped, the others leave at the next phase boundary,
    it is killed, and the job fails (exit code 1) saying so."""
    run = bench.run_fault(tmp_path, "digital", "stop", 0, exit_timeout=BOUND_S + 60)
    info = _describe(run)
    assert not run.hung, info
    assert run.returncode == 1, info
    assert run.fault_to_exit_s < BOUND_S, info
    assert not run.victim_left, info
    assert run.results is None
    assert "rank 0 failed, no results" in run.stderr, info
    assert "rank 0: killed (SIGKILL): unresponsive: stopped" in run.stderr, info


def launcher_worker(rank: int, world_size: int, out: str) -> None:
    """Rank 1 stops itself, rank 2 keeps running, rank 0 records what the launcher
    publishes about rank 1, then returns."""
    from sedma_torch.distributed.launch import reported_down

    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    elif rank == 2:
        time.sleep(300)
    else:
        limit = time.monotonic() + 60
        while not reported_down([1]) and time.monotonic() < limit:
            time.sleep(0.05)
        Path(out).write_text(json.dumps({str(k): v for k, v in reported_down([1, 2]).items()}))


@pytest.mark.timeout(120)
def test_launcher_reports_a_stopped_rank_and_kills_what_runs_after_the_primary(tmp_path):
    from sedma_torch.distributed.launch import launch

    out = tmp_path / "down.json"
    lines: list[str] = []
    start = time.monotonic()
    result = launch(
        launcher_worker,
        3,
        (str(out),),
        timeout_s=100,
        exit_grace_s=1.0,
        unresponsive_s=5.0,
        primary=0,
        log=lines.append,
    )
    elapsed = time.monotonic() - start
    assert elapsed < 60, (elapsed, lines)
    # rank 0 learnt from the store that rank 1 is stopped (and nothing about rank 2)
    assert list(json.loads(out.read_text())) == ["1"]
    assert "stopped" in json.loads(out.read_text())["1"]
    status = [(o.rank, o.status, o.exit_code) for o in result.outcomes]
    assert status == [(0, "ok", 0), (1, "unresponsive", None), (2, "lingering", None)], lines
    assert result.codes == [0, None, None]
    assert [o.rank for o in result.failed] == [1, 2]
    # killed exit_grace_s after rank 0 ended, not at timeout_s
    assert result.outcomes[1].ended_s - result.outcomes[0].ended_s < 5.0
    assert any("rank 1" in line and "is unresponsive: stopped" in line for line in lines)
    for o in result.outcomes:  # every worker reaped
        assert not os.path.exists(f"/proc/{o.pid}"), o
