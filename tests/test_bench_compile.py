"""``scripts/bench_compile.py``: converted models under ``torch.compile`` (graph breaks,
recompilations, correctness after optimizer steps). The end-to-end run (MLP with
fullgraph=True and ResNet-18, aot_eager) is slow (`pytest -m slow`); the in-process MLP
check with the aot_eager backend is not."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import sedma_torch as st

from .conftest import REPO


def _load_script(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # for its `import benchmark_utils`
    spec = importlib.util.spec_from_file_location(
        "bench_compile", REPO / "scripts" / "bench_compile.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compiled_mlp_has_no_break_adds_no_recompile_and_matches_digital(monkeypatch):
    bench = _load_script(monkeypatch)
    converted, digital = bench.pair(bench.make_mlp, bench.IDEAL)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    explained = bench.explain(converted, x)
    assert explained["graphs"] == 1 and explained["graph_breaks"] == 0, explained
    # eval b2,2,3,4 / train with 3 SGD steps / eval again, compiled with fullgraph=True
    seq, compiled = bench.sequence(converted, (64,), "aot_eager", fullgraph=True)
    seq_digital, _ = bench.sequence(digital, (64,), "aot_eager", fullgraph=True)
    assert seq["recompile_limit_warnings"] == 0
    assert seq["recompiles"] == seq_digital["recompiles"], (seq, seq_digital)
    assert seq["program_events_per_layer"] == bench.TRAIN_STEPS  # re-programmed after steps
    with torch.no_grad():
        y = compiled(x)
        reference = st.to_digital(copy.deepcopy(converted)).eval()(x)
    assert bench.rel(y, reference) < 1e-5
    torch._dynamo.reset()


@pytest.mark.slow
def test_bench_compile_quick_runs_without_breaks_or_recompile_storms(tmp_path):
    out_json = tmp_path / "bench_compile.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, whatever is installed
    proc = subprocess.run(
        [sys.executable, "scripts/bench_compile.py", "--quick", "--output", str(out_json)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "graphs / graph breaks" in proc.stdout
    models = json.loads(out_json.read_text())["models"]
    mlp = models["mlp"]
    assert mlp["explain"]["converted"]["graph_breaks"] == 0
    assert mlp["explain"]["converted"]["graphs"] == 1
    for side in ("converted", "digital"):
        assert mlp["sequence"][side]["recompile_limit_warnings"] == 0
    assert mlp["sequence"]["converted"]["recompiles"] == mlp["sequence"]["digital"]["recompiles"]
    assert mlp["ideal_rel_error"]["compiled_vs_digital"] < 1e-5
    resnet = models["resnet18"]
    assert resnet["explain"]["converted"]["graph_breaks"] == 0
    assert resnet["explain"]["converted"]["graphs"] == 1
    seq = resnet["sequence"]
    for side in ("converted", "digital"):
        assert seq[side]["recompile_limit_warnings"] == 0
    # no recompilation the digital model does not have (batch size, train/eval)
    assert seq["converted"]["recompiles"] == seq["digital"]["recompiles"]
    assert seq["converted"]["program_events_per_layer"] == 3  # one per SGD step
    assert resnet["ideal_rel_error"]["compiled_vs_digital"] < 1e-5
