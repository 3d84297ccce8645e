"""The README's "Entry points" lines (issue 15): each is run by a test or marked as needing
user data, and eval.py's newcomer paths (no weights, no checkpoint path, a collapsed chip)
say what to do.

The slow tests run the README lines as written in a fresh working folder, with the shared
data in place of /data/... and a small eval.limit; they skip when ../shared/data is absent.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from sedma_torch.data.digits import load_digits_split
from sedma_torch.experiments import run_eval
from sedma_torch.experiments.evaluation import collapse_hints
from sedma_torch.experiments.settings import resolve_settings
from sedma_torch.models.small_cnn import small_cnn
from sedma_torch.rram import PRESETS
from tests.data.test_coco_data import make_coco_fixture
from tests.data.test_squad_data import FLAT, squad_json, write

from ..conftest import REPO, SHARED_DATA
from .helpers import compose_cfg, run_app

THIS = "tests/experiments/test_readme_entry_points.py"

# README command (argv joined by spaces) -> the test that runs it
COVERED = {
    "python train.py rram=ag_asi train.hwa_epochs=3 logger=none": (
        f"{THIS}::test_readme_train_lines_run_as_written"
    ),
    "python train.py memory.partition=memory_guided deploy=default": (
        f"{THIS}::test_readme_train_lines_run_as_written"
    ),
    "python eval.py -m rram=epiram,ag_asi,alox_hfo2,taox_hfox": (
        f"{THIS}::test_readme_digits_eval_multirun_after_train"
    ),
    "python eval.py dataset=imagenet dataset.root=/data/imagenet model=efficientnet_lite0 "
    "eval.rram_settings=[epiram,ag_asi,alox_hfo2,taox_hfox] "
    "eval.corrections=[none,first_order] eval.limit=100": (
        f"{THIS}::test_readme_imagenet_line_on_the_shared_subset"
    ),
    "python eval.py dataset=squad dataset.path=/data/squad/dev-v1.1.json model=minilm_qa "
    "eval.limit=100": f"{THIS}::test_readme_squad_lines_on_the_shared_subset",
    "python scripts/finetune_squad.py --data /data/squad/dev-v1.1.json": (
        f"{THIS}::test_readme_squad_lines_on_the_shared_subset"
    ),
    "python eval.py dataset=squad dataset.path=/data/squad/dev-v1.1.json model=qa_checkpoint "
    "model.path=checkpoints/minilm_squad": f"{THIS}::test_readme_squad_lines_on_the_shared_subset",
    # the same commands with a tiny training set (train.epochs=1, dataset.limit_train=130)
    "python train.py distributed=memory_aware distributed.world_size=2": (
        "tests/experiments/test_train_distributed.py::"
        "test_two_rank_run_trains_identical_replicas_and_writes_results"
    ),
    "torchrun --nproc-per-node 2 train.py distributed=memory_aware hydra.run.dir=outputs/ddp": (
        "tests/experiments/test_train_distributed.py::test_under_torchrun_the_ranks_join_its_group"
    ),
}


def readme_entry_points() -> list[tuple[list[str], str]]:
    """(argv, raw text) of each command in the README's "Entry points" bash block; the raw
    text includes a comment line right above the command (``# needs: ...``)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Entry points\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands, current, note = [], "", ""
    for line in block.splitlines():
        if not current and line.lstrip().startswith("#"):
            note = line.strip()
            continue
        current += line
        if current.endswith("\\"):
            current = current[:-1]
            continue
        if current.strip():
            commands.append((shlex.split(current, comments=True), f"{current} {note}"))
        current, note = "", ""
    return commands


def readme_argv(prefix: str, replace: dict[str, str] | None = None) -> list[str]:
    """The README command starting with ``prefix``, without the program, with the
    ``replace`` substitutions (data paths, eval.limit) applied to its arguments."""
    found = [argv for argv, _ in readme_entry_points() if " ".join(argv).startswith(prefix)]
    assert len(found) == 1, f"README Entry points: {len(found)} commands start with {prefix!r}"
    args = found[0][2:]  # drop "python <script>"
    for old, new in (replace or {}).items():
        assert any(old in a for a in args), f"{old!r} not in the README line {found[0]}"
        args = [a.replace(old, new) for a in args]
    return args


def test_every_readme_entry_point_is_run_by_a_test_or_names_the_data_it_needs():
    commands = readme_entry_points()
    assert len(commands) >= 9
    seen = set()
    for argv, raw in commands:
        key = " ".join(argv)
        seen.add(key)
        if key in COVERED:
            path, name = COVERED[key].split("::")
            module = importlib.import_module(path[:-3].replace("/", "."))
            assert callable(getattr(module, name, None)), f"{COVERED[key]} does not exist"
        else:
            match = re.search(r"# needs: (\S.+)$", raw)
            assert match, f"README line {key!r} is neither run by a test nor marked '# needs:'"
    assert set(COVERED) <= seen, f"stale entries: {sorted(set(COVERED) - seen)}"


# -- digits: eval.py without model.weights -------------------------------------------------


def _save_small_cnn(path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = small_cnn().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def test_digits_eval_without_weights_uses_the_newest_train_run(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    older = outputs / "2026-01-02" / "09-00-00" / "model_digital.pt"
    newer = outputs / "2026-01-01" / "10-00-00" / "model_digital.pt"
    _save_small_cnn(older, seed=1)
    model = _save_small_cnn(newer, seed=2)
    os.utime(older, (1_900_000_000, 1_900_000_000))
    os.utime(newer, (2_000_000_000, 2_000_000_000))  # the newest file, not the last name
    cfg = compose_cfg(["logger=none", "memory=none", "eval.progress=false"])
    cfg["eval"]["rram_settings"] = ["ideal"]
    payload = run_eval(cfg, tmp_path / "run", outputs_dir=outputs)
    out = capsys.readouterr().out
    assert f"model.weights not given: using {newer} " in out
    assert payload["model_weights"] == str(newer)
    # independent reference: all 397 test digits through the saved model
    _, test = load_digits_split(397, seed=0)
    x = torch.stack([test[i][0] for i in range(len(test))])
    y = torch.tensor([int(test[i][1]) for i in range(len(test))])
    with torch.no_grad():
        expected = (model(x).argmax(1) == y).float().mean().item()
    assert payload["n_samples"] == 397
    assert payload["rows"][0]["top1"] == pytest.approx(expected)


def test_digits_eval_without_weights_or_train_run_says_run_train_first(tmp_path):
    cfg = compose_cfg(["logger=none", "memory=none"])
    outputs = tmp_path / "outputs"
    with pytest.raises(FileNotFoundError) as err:
        run_eval(cfg, tmp_path / "run", outputs_dir=outputs)
    msg = str(err.value)
    assert f"no train.py run was found under {str(outputs)!r}" in msg
    assert "run `python train.py` first" in msg
    assert "model.weights=<path to a model_digital.pt or model_hwa.pt>" in msg
    assert not (tmp_path / "run" / "results.json").exists()


def test_weights_of_another_architecture_name_the_file_and_the_model_keys(tmp_path):
    path = tmp_path / "outputs" / "run" / "model_digital.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(small_cnn(channels=(8, 8)).state_dict(), path)
    cfg = compose_cfg(["logger=none", "memory=none"])
    with pytest.raises(ValueError, match=r"does not fit model=small_cnn .*channels=\[16, 32\]"):
        run_eval(cfg, tmp_path / "run", outputs_dir=tmp_path / "outputs")


# -- COCO and SQuAD without the weights / checkpoint path ----------------------------------


def test_coco_without_weights_fails_naming_the_file_to_provide(tmp_path):
    make_coco_fixture(tmp_path / "coco", n_images=2, seed=0)
    cfg = compose_cfg(
        [
            "dataset=coco",
            f"dataset.root={tmp_path / 'coco'}",
            "model=fasterrcnn_mobilenet_v3",
            "logger=none",
            "memory=none",
        ]
    )
    with pytest.raises(FileNotFoundError) as err:
        run_eval(cfg, tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("model=fasterrcnn_mobilenet_v3 needs COCO detector weights")
    assert "model.weights=/path/to/fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth" in msg
    assert (
        "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth" in msg
    )
    assert not (tmp_path / "run" / "results.json").exists()


def test_qa_checkpoint_without_path_says_it_is_required_and_what_it_holds(tmp_path):
    path = write(tmp_path, squad_json("1.1"))
    cfg = compose_cfg(
        ["dataset=squad", f"dataset.path={path}", "model=qa_checkpoint", "logger=none"]
    )
    with pytest.raises(ValueError) as err:
        run_eval(cfg, tmp_path / "run")
    msg = str(err.value)
    assert "model.path is required: pass model.path=<folder>" in msg
    assert "AutoModelForQuestionAnswering" in msg and "scripts/finetune_squad.py" in msg
    assert "'???'" not in msg


def test_eval_reads_a_flat_squad_v2_list_and_reports_has_ans_no_ans(tmp_path):
    from sedma_torch.models.qa import build_qa

    from .test_qa import TINY

    torch.manual_seed(0)
    model, tokenizer = build_qa(config=TINY)
    ckpt = tmp_path / "qa"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    path = write(tmp_path, {"version": 2.0, "data": FLAT}, "sample.json")
    cfg = compose_cfg(
        [
            "dataset=squad",
            f"dataset.path={path}",
            "dataset.max_length=64",
            "dataset.stride=16",
            "model=qa_checkpoint",
            f"model.path={ckpt}",
            "logger=none",
            "memory=none",
            "eval.progress=false",
            "eval.rram_settings=[ideal]",
        ]
    )
    payload = run_eval(cfg, tmp_path / "run")
    assert payload["n_samples"] == 3
    for row in payload["rows"]:
        # f2 is the one unanswerable question: HasAns over f1, f3; NoAns over f2
        assert {"HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"} <= set(row)
        assert row["exact_match"] == pytest.approx(
            (2 * row["HasAns_exact"] + row["NoAns_exact"]) / 3
        )
        assert row["f1"] == pytest.approx((2 * row["HasAns_f1"] + row["NoAns_f1"]) / 3)


# -- ImageNet: correction settings and the collapse hint -----------------------------------


def test_rram_settings_take_preset_slash_correction_like_the_table_labels():
    (setting,) = resolve_settings(["taox_hfox/first_order"], {}, base_label="x")
    assert setting.label == "taox_hfox/first_order"
    assert setting.config == PRESETS["taox_hfox"].replace(correction="first_order", denoise="none")
    with pytest.raises(ValueError, match=r"unknown correction mode 'second' in 'epiram/second'"):
        resolve_settings(["epiram/second"], {})


def _row(label, top1, material, correction):
    return {"label": label, "top1": top1, "material": material, "correction": correction}


def test_collapse_hint_names_the_correction_switch_only_for_collapsed_uncorrected_rows():
    rows = [
        _row("digital", 0.80, "digital", "-"),
        _row("taox_hfox/none", 0.0, "taox_hfox", "none"),
        _row("alox_hfo2/none", 0.24, "alox_hfo2", "none"),  # worse, not collapsed
        _row("epiram/first_order", 0.0, "epiram", "first_order"),  # corrected already
    ]
    hints = collapse_hints(rows, 1000)
    assert hints == [
        "hint: taox_hfox/none top-1 0.0000 is near chance (1/1000 = 0.0010) while digital "
        "gets 0.8000: uncorrected read errors compound through the layers on taox_hfox. Turn "
        "on first-order correction: eval.corrections=[none,first_order] (every setting both "
        "ways), 'eval.rram_settings=[taox_hfox/first_order]', or rram.correction=first_order"
    ]
    # a digital model near chance itself gets no hint
    assert collapse_hints([_row("digital", 0.004, "digital", "-"), rows[1]], 1000) == []


# -- the README lines themselves (slow) ----------------------------------------------------


def _run(cwd: Path, script: str, args: list[str], timeout: float = 1800):
    return run_app(script, args, timeout=timeout, cwd=cwd)


def _needs_shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set SEDMA_SHARED_DATA)")
    return SHARED_DATA


@pytest.mark.slow
def test_readme_train_lines_run_as_written(tmp_path):
    for prefix in ("python train.py rram=ag_asi", "python train.py memory.partition="):
        work = tmp_path / prefix.split()[-1].split("=")[0]
        work.mkdir()
        _run(work, "train.py", readme_argv(prefix))
        assert len(list((work / "outputs").rglob("model_digital.pt"))) == 1


@pytest.mark.slow
def test_readme_digits_eval_multirun_after_train(tmp_path):
    _run(tmp_path, "train.py", [])  # the Quickstart's `python train.py`
    (weights,) = (tmp_path / "outputs").rglob("model_digital.pt")
    proc = _run(tmp_path, "eval.py", readme_argv("python eval.py -m rram="))
    relative = weights.relative_to(tmp_path)
    assert proc.stdout.count(f"model.weights not given: using {relative} ") == 4
    runs = sorted(p.parent for p in (tmp_path / "multirun").rglob("results.json"))
    labels = set()
    for run in runs:
        payload = json.loads((run / "results.json").read_text())
        assert payload["model_weights"] == str(relative)
        assert payload["rows"][0]["top1"] > 0.9  # the trained CNN, not a random one
        labels.add(payload["rows"][1]["label"])
    assert labels == {"epiram", "ag_asi", "alox_hfo2", "taox_hfox"}


@pytest.mark.slow
def test_readme_imagenet_line_on_the_shared_subset(tmp_path):
    root = _needs_shared_data() / "imagenet-val-subset"
    args = readme_argv(
        "python eval.py dataset=imagenet",
        {"/data/imagenet": str(root), "eval.limit=100": "eval.limit=10"},
    )
    proc = _run(tmp_path, "eval.py", [*args, "hydra.run.dir=run"])
    payload = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = {r["label"]: r for r in payload["rows"]}
    assert len(rows) == 9 and payload["n_samples"] == 10
    assert rows["digital"]["top1"] >= 0.5
    for material in ("epiram", "ag_asi", "alox_hfo2", "taox_hfox"):
        # first-order correction keeps the chip usable
        assert rows[f"{material}/first_order"]["top1"] >= 0.5, rows
        collapsed = rows[f"{material}/none"]["top1"] < 0.1 * rows["digital"]["top1"]
        assert (f"hint: {material}/none top-1" in proc.stdout) == collapsed


@pytest.mark.slow
def test_readme_squad_lines_on_the_shared_subset(tmp_path):
    path = _needs_shared_data() / "squad" / "dev-v1.1-subset.json"
    data = {"/data/squad/dev-v1.1.json": str(path)}
    args = readme_argv(
        "python eval.py dataset=squad dataset.path=/data/squad/dev-v1.1.json model=minilm_qa",
        {**data, "eval.limit=100": "eval.limit=8"},
    )
    _run(tmp_path, "eval.py", [*args, "hydra.run.dir=minilm"])
    rows = json.loads((tmp_path / "minilm" / "results.json").read_text())["rows"]
    assert rows[0]["label"] == "digital" and 0 <= rows[0]["f1"] <= 1
    # fine-tune as the README says, on one article for one epoch, into this test's folder
    args = readme_argv("python scripts/finetune_squad.py", data)
    tiny = ["--train-articles", "0", "--eval-articles", "9", "--epochs", "1"]
    tiny += ["--max-length", "128", "--stride", "32", "--rram", "", "--threads", "1"]
    tiny += ["--output", "checkpoints/minilm_squad", "--results", "results/finetune.json"]
    _run(tmp_path, "scripts/finetune_squad.py", [*args, *tiny])
    assert (tmp_path / "checkpoints" / "minilm_squad" / "config.json").is_file()
    args = readme_argv(
        "python eval.py dataset=squad dataset.path=/data/squad/dev-v1.1.json model=qa_checkpoint",
        data,
    )
    _run(tmp_path, "eval.py", [*args, "eval.limit=8", "hydra.run.dir=ckpt"])
    out = json.loads((tmp_path / "ckpt" / "results.json").read_text())
    assert out["n_samples"] == 8 and out["model"] == "qa"
