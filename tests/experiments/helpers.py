"""Running the Hydra apps from tests: compose API in-process, or a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ..conftest import REPO


def compose_cfg(overrides: list[str]) -> dict:
    """The config train.py / eval.py would see, as plain data."""
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


def app_env() -> dict[str, str]:
    """Environment for a subprocess: this checkout's code, one thread, wandb offline."""
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
    }


def run_app(
    script: str, args: list[str], *, timeout: float = 600, cwd: Path = REPO
) -> subprocess.CompletedProcess:
    """Run ``python <script> <args>`` in ``cwd`` (default the repository root); fails the
    test on error."""
    proc = subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=app_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{script} {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def popen_app(script: str, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *args],
        cwd=REPO,
        env=app_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def runs_under(folder: Path) -> list[Path]:
    """Run directories (holding results.json) under ``folder``, sorted."""
    return sorted(p.parent for p in folder.rglob("results.json"))
