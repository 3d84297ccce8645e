"""The demo and benchmark scripts run end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def _run(args: list[str], tmp_path) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, whatever is installed
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_demo_layers_runs_and_reports_every_material(tmp_path):
    out = _run(["scripts/demo_layers.py", "--epochs", "2", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "demo_layers.json").read_text())
    assert {r["material"] for r in rows} == {
        "digital",
        "epiram",
        "ag_asi",
        "alox_hfo2",
        "taox_hfox",
    }
    assert (tmp_path / "demo_layers.png").stat().st_size > 0
    assert "taox_hfox" in out


@pytest.mark.slow
def test_mvm_table_runs_on_the_meliso_matrix(tmp_path, shared_data):
    _run(
        [
            "scripts/mvm_table.py",
            "--seeds",
            "1",
            "--matrix",
            str(shared_data / "bcsstk02.mtx"),
            "--output-dir",
            str(tmp_path),
        ],
        tmp_path,
    )
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.png"))


@pytest.mark.slow
def test_bench_layers_quick_runs(tmp_path):
    out = _run(
        ["scripts/bench_layers.py", "--quick", "--output", str(tmp_path / "b.json")], tmp_path
    )
    assert "Linear" in out and (tmp_path / "b.json").exists()


@pytest.mark.slow
def test_hwa_digits_runs_and_reports_both_models(tmp_path):
    _run(["scripts/hwa_digits.py", "--seeds", "1", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "hwa_digits.json").read_text())
    assert {r["material"] for r in rows} == {"ag_asi", "alox_hfo2"}
    assert all(0 < r["converted"] <= 1 and 0 < r["hardware_aware"] <= 1 for r in rows)
