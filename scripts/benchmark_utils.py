"""Helpers shared by the benchmark scripts: provenance (machine, code revision) and timing."""

from __future__ import annotations

import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    """``<commit>`` of the repository, with ``+dirty`` when sedma_torch/ has local changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "sedma_torch"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in ms (CUDA events on a GPU, perf_counter on the CPU)."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return float(start.elapsed_time(end))
    begin = time.perf_counter()
    fn()
    return (time.perf_counter() - begin) * 1e3


def time_pair_ms(
    rram_fn: Callable[[], object],
    digital_fn: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeats: int,
) -> tuple[float, float, float, float]:
    """(median, median, min, min) ms of each function, calls interleaved, after ``warmup``
    calls of each."""
    for _ in range(warmup):
        rram_fn()
        digital_fn()
    synchronize(device)
    rram_ms, digital_ms = [], []
    for _ in range(repeats):
        rram_ms.append(time_once_ms(rram_fn, device))
        digital_ms.append(time_once_ms(digital_fn, device))
    return statistics.median(rram_ms), statistics.median(digital_ms), min(rram_ms), min(digital_ms)


def time_median_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int):
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(time_once_ms(fn, device) for _ in range(repeats))
