"""The command line a newcomer meets (issue 15 items 5, 6, 10, 12 and the `sedma` CLI):
real subprocess runs of ``sedma`` / ``python -m sedma_torch`` / ``train.py`` / ``eval.py``."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import REPO
from .helpers import app_env

TINY = [
    "logger=none",
    "train.epochs=1",
    "train.hwa_epochs=1",
    "dataset.limit_train=64",
    "train.batch_size=32",
    "train.compare_materials=[]",
    "train.compare_corrections=[none]",
]


def _run(args: list[str], cwd: Path, *, env: dict | None = None, timeout: float = 300, ok=True):
    proc = subprocess.run(
        args,
        cwd=cwd,
        env=env or app_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if ok:
        assert proc.returncode == 0, (
            f"{args[:4]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def _sedma(*args: str) -> list[str]:
    return [sys.executable, "-m", "sedma_torch", *args]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One ``python -m sedma_torch train`` from a folder outside the checkout, progress bars
    on, deployment hook on with its default output folder, a fresh per-user data folder
    (no $SEDMA_MEMORY_PATH) and a CUDA_HOME without a CUDA device."""
    tmp = tmp_path_factory.mktemp("cli")
    env = app_env()
    env.pop("SEDMA_MEMORY_PATH", None)
    env.pop("SEDMA_MEMORY_URL", None)
    env["XDG_DATA_HOME"] = str(tmp / "xdg")
    env["CUDA_HOME"] = str(tmp)  # torch.utils.cpp_extension would say "No CUDA runtime"
    work = tmp / "work"
    work.mkdir()
    run_dir = tmp / "run"
    args = [*TINY, "train.progress=true", "deploy=default", f"hydra.run.dir={run_dir}"]
    first = _run(_sedma("train", *args), work, env=env)
    second = _run(_sedma("train", *args[:-1], f"hydra.run.dir={tmp / 'run2'}"), work, env=env)
    return {"tmp": tmp, "work": work, "run": run_dir, "first": first, "second": second, "env": env}


def test_sedma_train_forwards_overrides_and_writes_the_run(cli_run):
    payload = json.loads((cli_run["run"] / "results.json").read_text())
    assert [h["epoch"] for h in payload["history"]] == [1, 1]  # train.epochs=1, hwa_epochs=1
    assert [r["label"] for r in payload["rows"]] == [
        "digital",
        "hwa:digital",
        "hwa:taox_hfox/none",
    ]
    assert (cli_run["run"] / ".hydra" / "overrides.yaml").is_file()


def test_memory_lives_in_the_user_data_folder_and_the_run_says_so(cli_run):
    store = cli_run["tmp"] / "xdg" / "sedma_torch" / "sedma_memory.db"
    assert store.is_file(), f"no store at {store}"
    assert not list(cli_run["work"].glob("*.db")), "a memory store was created in the cwd"
    line = next(ln for ln in cli_run["first"].stdout.splitlines() if ln.startswith("memory:"))
    assert str(store) in line and "record(s) at start" in line
    assert "memory=none" in line and "later runs start from" in line
    first = json.loads((cli_run["run"] / "results.json").read_text())["memory"]
    assert first == {"store": str(store), "records_at_start": 0}
    second = json.loads((cli_run["tmp"] / "run2" / "results.json").read_text())["memory"]
    assert second["store"] == str(store) and second["records_at_start"] > 0
    assert f"{second['records_at_start']} record(s) at start" in cli_run["second"].stdout


def test_deploy_writes_into_the_run_folder_and_prints_a_summary(cli_run):
    for run, proc in (
        (cli_run["run"], cli_run["first"]),
        (cli_run["tmp"] / "run2", cli_run["second"]),
    ):
        decisions = (run / "deploy" / "decisions.jsonl").read_text().splitlines()
        assert [json.loads(d)["reason"] for d in decisions] == ["initial"]  # not appended to
        assert list((run / "deploy" / "v000").glob("*.yaml"))
        assert "deploy: 1 decision(s): initial at step 1" in proc.stdout
        assert f"manifests in {run / 'deploy'}/v000" in proc.stdout
    assert not (cli_run["work"] / "results").exists()


def test_job_log_keeps_the_printed_table(cli_run):
    log = (cli_run["run"] / "train.log").read_text()
    assert "setting" in log and "hwa:digital" in log and "memory: SQLite file" in log


def test_redirected_output_has_no_bar_escape_codes_but_one_line_per_stage(cli_run):
    err = cli_run["first"].stderr
    assert "\x1b[" not in err and "\r" not in err, f"bar escape codes in stderr: {err[-800:]!r}"
    assert re.search(r"^digital epochs: 1/1 in [0-9.]+ s$", err, re.M), err[-2000:]
    assert re.search(r"^hwa epochs: 1/1 in [0-9.]+ s$", err, re.M), err[-2000:]
    assert "No CUDA runtime is found" not in err


def test_cuda_home_notice_is_dropped_only_without_cuda(tmp_path):
    env = {**app_env(), "CUDA_HOME": str(tmp_path)}
    code = "import sedma_torch, torch.utils.cpp_extension, logging; "
    code += "logging.getLogger('torch.utils.cpp_extension').warning('other message')"
    proc = _run([sys.executable, "-c", code], tmp_path, env=env)
    assert "No CUDA runtime is found" not in proc.stderr
    assert "other message" in proc.stderr  # the logger's other records still pass


def test_failed_run_records_the_error_in_its_log(tmp_path):
    run_dir = tmp_path / "failed"
    proc = _run(
        [
            sys.executable,
            str(REPO / "train.py"),
            *TINY,
            "train.epochs=-1",
            f"hydra.run.dir={run_dir}",
        ],
        tmp_path,
        ok=False,
    )
    assert proc.returncode != 0
    log = (run_dir / "train.log").read_text()
    assert "FAILED: ValueError" in log and "train.epochs must be an int >= 0" in log
    assert "Traceback" in log


def test_multirun_with_many_overrides_and_slashes_and_a_summary(tmp_path):
    sweep = tmp_path / "sweep"
    many = [
        *TINY,
        "train.progress=false",
        "train.lr=0.003",
        "train.hwa_lr=0.001",
        "train.eval_batch_size=512",
        "eval.batch_size=64",
        f"memory.url={tmp_path}/a/b/memory.db",  # a '/' in an override
        "seed=0,1",
    ]
    assert len(many) >= 13
    proc = _run(
        [sys.executable, str(REPO / "train.py"), "-m", *many, f"hydra.sweep.dir={sweep}"], tmp_path
    )
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for num, seed in (("0", 0), ("1", 1)):
        overrides = yaml.safe_load((sweep / num / ".hydra" / "overrides.yaml").read_text())
        assert f"seed={seed}" in overrides
        assert (sweep / num / "results.json").is_file()
    summary = (sweep / "summary.md").read_text()
    assert "| 0 | seed=0 | digital | top1 |" in summary
    assert "| 1 | seed=1 | digital | top1 |" in summary
    assert summary.strip() in proc.stdout


def test_app_help_describes_jobs_groups_and_results(tmp_path):
    proc = _run([sys.executable, str(REPO / "eval.py"), "--help"], tmp_path)
    out = proc.stdout
    assert "train.py" in out and "eval.py" in out
    assert re.search(r"^rram: .*ag_asi", out, re.M) and re.search(
        r"^memory: default, none", out, re.M
    )
    assert "outputs/<date>/<time>/" in out and "summary.md" in out


def test_sedma_help_lists_jobs_and_where_results_go(tmp_path):
    for args in (_sedma("--help"), [shutil.which("sedma") or "", "--help"]):
        if not args[0]:
            pytest.fail("the sedma console script is not installed (pip install -e .)")
        out = _run(args, tmp_path).stdout
        for job in ("train", "eval", "reproduce", "bench"):
            assert re.search(rf"^  {job} ", out, re.M), f"{job} missing from {out}"
        assert "outputs/<date>/<time>/" in out


def test_sedma_bench_runs_the_script_and_names_unknown_ones(tmp_path):
    proc = _run(_sedma("bench", "placement", "--help"), tmp_path)
    assert "usage: bench_placement.py" in proc.stdout
    bad = _run(_sedma("bench", "no_such"), tmp_path, ok=False)
    assert (
        bad.returncode == 2 and "no benchmark 'no_such'" in bad.stderr and "placement" in bad.stderr
    )
    assert "placement" in _run(_sedma("bench", "--list"), tmp_path).stdout


def test_sedma_reproduce_lists_train_then_eval(tmp_path):
    out = _run(_sedma("reproduce", "--list", "--out", str(tmp_path / "r")), tmp_path).stdout
    assert f"sedma train hydra.run.dir={tmp_path / 'r' / 'train'}" in out
    assert f"sedma eval model.weights={tmp_path / 'r' / 'train' / 'model_digital.pt'}" in out
    assert not (tmp_path / "r").exists()  # --list runs nothing


def test_sedma_reproduce_runs_train_then_eval(tmp_path):
    out_dir = tmp_path / "r"
    proc = _run(
        _sedma(
            "reproduce", "--out", str(out_dir), *TINY, "train.progress=false", "eval.progress=false"
        ),
        tmp_path,
    )
    assert (out_dir / "train" / "results.json").is_file()
    evaluated = json.loads((out_dir / "eval" / "results.json").read_text())
    assert evaluated["rows"][0]["label"] == "digital"
    assert "sedma reproduce: done" in proc.stdout
    assert os.path.exists(out_dir / "eval" / "eval.log")


def test_a_config_error_is_one_line_and_leaves_no_run_folder(tmp_path):
    """A wrong value caught before the job runs: exit 2, the message naming the key, no
    traceback, and no ``outputs/<date>/<time>/`` left behind (issue 15 item 10)."""
    proc = _run([sys.executable, str(REPO / "train.py"), "train.lr=fast"], tmp_path, ok=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "train: invalid config: config key 'train.lr' must be a number" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists(), sorted(p.name for p in tmp_path.rglob("*"))
    kept = tmp_path / "kept"  # a folder the user named is never removed
    proc = _run(
        [sys.executable, str(REPO / "train.py"), "train.lr=fast", f"hydra.run.dir={kept}"],
        tmp_path,
        ok=False,
    )
    assert proc.returncode == 2 and kept.is_dir() and f"details kept in {kept}" in proc.stderr


def test_a_value_error_in_the_job_prints_its_message_and_keeps_the_traceback_in_the_log(
    tmp_path,
):
    run_dir = tmp_path / "run"
    args = [sys.executable, str(REPO / "eval.py"), "model=qa_checkpoint", "dataset=squad"]
    proc = _run([*args, f"hydra.run.dir={run_dir}"], tmp_path, ok=False)
    assert proc.returncode == 1
    assert "eval: ValueError: dataset=squad: dataset.path is not set" in proc.stderr
    assert "Traceback" not in proc.stderr and f"traceback in {run_dir}" in proc.stderr
    assert "Traceback" in (run_dir / "eval.log").read_text()
    env = app_env()
    env["HYDRA_FULL_ERROR"] = "1"  # developers get the traceback on screen
    full = _run([*args, f"hydra.run.dir={tmp_path / 'full'}"], tmp_path, env=env, ok=False)
    assert full.returncode == 1 and "Traceback" in full.stderr
