"""Fault drill: kill -9 / SIGSTOP one rank of ``train.py distributed=memory_aware``.

Runs ``python train.py distributed=memory_aware distributed.world_size=3`` as a real
subprocess (small settings: 130 training samples per rank, 4 digital and 4 hardware-aware
epochs), waits until rank 0 prints the first epoch of a phase (``digital epoch 1/4`` or
``hwa epoch 1/4``: the other ranks are then in the second epoch of that phase), and sends
``SIGKILL`` or ``SIGSTOP`` to one rank (its pid from the launcher's ``distributed: started
3 rank(s): rank 0 pid ...`` line, else the train.py process's spawned children in start
order). Then it measures how long the job takes to exit, and reads the results. Prints
one row per fault: phase, fault, rank, seconds from the fault to the exit of train.py,
exit code, the survivors' final accuracy (test top1 of the digital model and of the
hardware-aware model on the training chip, from results.json), and whether the dead rank
is reported (results.json ``distributed.failed_ranks`` and train.py's stderr name it). A
run that does not exit within ``--exit-timeout`` seconds of the fault is killed and shown
as ``hung``. The first row is a run without a fault.

    python scripts/bench_faults.py                 # 4 faults of rank 1 + baseline, ~3 min
    python scripts/bench_faults.py --rank 0 --phases digital --faults stop

:func:`run_fault` is the driver of the fault-injection tests (tests/faults).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

FAST_ARGS = [
    "distributed=memory_aware",
    "distributed.world_size=3",
    "logger=none",
    "train.progress=false",
    "train.epochs=4",
    "train.hwa_epochs=4",
    "dataset.limit_train=390",
    "train.batch_size=32",
    "train.compare_materials=[]",
    "train.compare_corrections=[none]",
    "distributed.deadline_s=1.0",
    "distributed.refresh_deadline_s=2.0",
    "distributed.readmit_wait_s=1.0",
    "distributed.refresh_every=5",
    "distributed.pg_timeout_s=60",
]
"""Small settings (the exchange's deadlines short, so that a stopped rank costs seconds).
The launcher's ``exit_grace_s`` and ``unresponsive_s`` keep their defaults (10 s)."""

SIGNALS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP}
_STARTED = re.compile(r"distributed: started \d+ rank\(s\): (.*)")


@dataclass
class FaultRun:
    """What one fault drill observed."""

    phase: str | None
    fault: str | None
    rank: int | None
    returncode: int | None
    """train.py's exit code (None: it did not exit, see ``hung``)."""
    hung: bool
    """train.py was still running ``exit_timeout`` seconds after the fault (killed)."""
    fault_to_exit_s: float | None
    """Seconds from the fault (or the start, without a fault) to train.py's exit."""
    victim_pid: int | None
    victim_left: bool
    """The faulted rank's process still existed after train.py exited (killed then)."""
    stdout: str
    stderr: str
    results: dict[str, Any] | None
    """results.json, when written."""
    pids: dict[int, int] = field(default_factory=dict)
    """Rank -> pid, as found."""

    def top1(self, label: str) -> float | None:
        if not self.results:
            return None
        for row in self.results.get("rows", []):
            if row.get("label") == label:
                return row.get("top1")
        return None

    @property
    def failed_ranks(self) -> list[int] | None:
        if not self.results:
            return None
        return (self.results.get("distributed") or {}).get("failed_ranks")

    @property
    def dead_reported(self) -> bool:
        """results.json lists the faulted rank as failed and stderr names it."""
        return (
            self.rank is not None
            and self.rank in (self.failed_ranks or [])
            and f"rank {self.rank}:" in self.stderr
        )


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",  # rank 0's epoch lines arrive when printed
    }


def _children(pid: int) -> list[int]:
    """Spawned worker processes of ``pid`` (multiprocessing spawn), in start order."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if int(fields[1]) == pid and "spawn_main" in cmd and "resource_tracker" not in cmd:
            found.append((int(fields[19]), int(entry)))  # start time, pid
    return [p for _, p in sorted(found)]


def _exists(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_tree(proc: subprocess.Popen, extra: list[int]) -> None:
    """SIGKILL train.py, its workers and ``extra`` (our own processes only)."""
    victims = set(extra)
    if proc.poll() is None:
        victims.update(_children(proc.pid))
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)


def run_fault(
    run_dir: str | Path,
    phase: str | None,
    fault: str | None,
    rank: int = 1,
    *,
    extra_args: list[str] | tuple[str, ...] = (),
    start_timeout: float = 240.0,
    exit_timeout: float = 120.0,
) -> FaultRun:
    """Run train.py (:data:`FAST_ARGS`) in ``run_dir``; when rank 0 prints
    ``<phase> epoch 1/``, send ``fault`` (``kill``: SIGKILL, ``stop``: SIGSTOP) to
    ``rank``; wait at most ``exit_timeout`` s for the exit. ``phase=None``: no fault."""
    if fault is not None and fault not in SIGNALS:
        raise ValueError(f"fault must be one of {sorted(SIGNALS)}, got {fault!r}")
    run_dir = Path(run_dir)
    cmd = [
        sys.executable,
        str(REPO / "train.py"),
        *FAST_ARGS,
        *extra_args,
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    out: list[str] = []
    err: list[str] = []

    def read_out() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            out.append(line)
            lines.put(line)
        lines.put(None)

    def read_err() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            err.append(line)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_out, read_err)]
    for t in readers:
        t.start()
    pids: dict[int, int] = {}
    victim: int | None = None
    start = time.monotonic()
    fault_at = start
    trigger = f"{phase} epoch 1/" if phase else None
    try:
        if trigger is not None:
            limit = start + start_timeout
            while True:
                try:
                    line = lines.get(timeout=max(limit - time.monotonic(), 0.01))
                except queue.Empty:
                    raise TimeoutError(f"no {trigger!r} line within {start_timeout} s") from None
                if line is None:
                    raise RuntimeError(
                        f"train.py ended before {trigger!r}:\n{''.join(err)[-3000:]}"
                    )
                m = _STARTED.search(line)
                if m:
                    pids = {
                        int(r): int(p) for r, p in re.findall(r"rank (\d+) pid (\d+)", m.group(1))
                    }
                if line.startswith(trigger):
                    break
            children = _children(proc.pid)
            if not pids:  # a launcher that does not print them: start order
                pids = dict(enumerate(children))
            victim = pids[rank]
            if victim not in children:
                raise RuntimeError(f"rank {rank}'s pid {victim} is not a worker of train.py")
            os.kill(victim, SIGNALS[fault])  # type: ignore[index]
            fault_at = time.monotonic()
        try:
            proc.wait(timeout=exit_timeout)
            hung = False
        except subprocess.TimeoutExpired:
            hung = True
        ended = time.monotonic()
    finally:
        if proc.poll() is None:
            _kill_tree(proc, [victim] if victim else [])
    victim_left = victim is not None and _exists(victim)
    if victim_left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)  # type: ignore[arg-type]
    for t in readers:
        t.join(10)
    path = run_dir / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else None
    return FaultRun(
        phase=phase,
        fault=fault,
        rank=rank if fault else None,
        returncode=None if hung else proc.returncode,
        hung=hung,
        fault_to_exit_s=None if hung else ended - fault_at,
        victim_pid=victim,
        victim_left=victim_left,
        stdout="".join(out),
        stderr="".join(err),
        results=results,
        pids=pids,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", nargs="+", default=["digital", "hwa"])
    parser.add_argument("--faults", nargs="+", default=["kill", "stop"], choices=sorted(SIGNALS))
    parser.add_argument("--rank", type=int, default=1, help="the rank to fault (of 3)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without fault")
    parser.add_argument("--exit-timeout", type=float, default=120.0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = parser.parse_args(argv)
    cases: list[tuple[str | None, str | None]] = [] if a.no_baseline else [(None, None)]
    cases += [(p, f) for p in a.phases for f in a.faults]
    header = (
        f"{'phase':8} {'fault':6} {'rank':>4} {'fault->exit s':>13} {'exit':>5} "
        f"{'digital top1':>12} {'hwa top1':>8} {'dead rank reported':>18}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    chip = None
    with tempfile.TemporaryDirectory(prefix="bench_faults_") as tmp:
        if not os.environ.get("SEDMA_MEMORY_URL") and not os.environ.get("SEDMA_MEMORY_PATH"):
            # the drills' transfer outcomes stay out of ./sedma_memory.db
            os.environ["SEDMA_MEMORY_PATH"] = str(Path(tmp) / "sedma_memory.db")
        for i, (phase, fault) in enumerate(cases):
            run = run_fault(
                Path(tmp) / f"run{i}", phase, fault, a.rank, exit_timeout=a.exit_timeout
            )
            if chip is None and run.results:
                labels = [r["label"] for r in run.results["rows"]]
                chip = next((x for x in labels if x.startswith("hwa:") and x != "hwa:digital"), "")
            hwa = run.top1(chip) if chip else None
            row = {
                "phase": phase or "-",
                "fault": fault or "none",
                "rank": run.rank,
                "fault_to_exit_s": run.fault_to_exit_s,
                "exit_code": run.returncode,
                "hung": run.hung,
                "digital_top1": run.top1("digital"),
                "hwa_top1": hwa,
                "dead_rank_reported": run.dead_reported if fault else None,
                "failed_ranks": run.failed_ranks,
                "victim_left_running": run.victim_left,
            }
            rows.append(row)

            def num(v: float | None, fmt: str) -> str:
                return "-" if v is None else format(v, fmt)

            seconds = "hung" if run.hung else num(run.fault_to_exit_s, ".1f")
            reported = "-" if fault is None else ("yes" if run.dead_reported else "no")
            print(
                f"{row['phase']:8} {row['fault']:6} {num(run.rank, 'd'):>4} {seconds:>13} "
                f"{num(run.returncode, 'd'):>5} {num(row['digital_top1'], '.4f'):>12} "
                f"{num(hwa, '.4f'):>8} {reported:>18}",
                flush=True,
            )
    print(f"(fault->exit for the baseline: start to exit; hwa top1: the {chip} row)")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
