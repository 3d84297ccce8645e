"""train.py: a short run end to end, seeded determinism, and resume after SIGKILL."""

from __future__ import annotations

import json
import signal
import time

import pytest
import torch

from sedma_torch.experiments import load_checkpoint, run_train
from sedma_torch.models.small_cnn import small_cnn

from .helpers import compose_cfg, popen_app, run_app

TINY = [
    "logger=none",
    "train.progress=false",
    "train.epochs=2",
    "train.hwa_epochs=1",
    "dataset.limit_train=96",
    "train.batch_size=32",
    "train.compare_materials=[taox_hfox]",
    "train.compare_corrections=[none,first_order]",
]


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_short_run_trains_both_phases_and_compares(tmp_path):
    payload = run_train(compose_cfg(TINY), tmp_path, rram_label="open_loop")
    assert [r["label"] for r in payload["rows"]] == [
        "digital",
        "taox_hfox/none",
        "taox_hfox/first_order",
        "hwa:digital",
        "hwa:taox_hfox/none",
        "hwa:taox_hfox/first_order",
    ]
    assert [(h["phase"], h["epoch"]) for h in payload["history"]] == [
        ("digital", 1),
        ("digital", 2),
        ("hwa", 1),
    ]
    for r in payload["rows"]:
        assert 0 <= r["top1"] <= 1 and r["n_samples"] == 397
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(payload["rows"]))
    assert (tmp_path / "results.png").stat().st_size > 0
    # the trained models load into a plain small CNN; the HWA weights moved away from digital
    digital, hwa = small_cnn(), small_cnn()
    digital.load_state_dict(_weights(tmp_path / "model_digital.pt"))
    hwa.load_state_dict(_weights(tmp_path / "model_hwa.pt"))
    assert not torch.equal(digital[0].weight, hwa[0].weight)
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert (ckpt["phase"], ckpt["epoch"]) == ("hwa", 1)
    assert any(k.endswith("g_pos") for k in ckpt["model"])  # programmed conductances saved


def test_same_seed_gives_identical_weights_and_another_seed_does_not(tmp_path):
    quick = [*TINY, "train.compare_materials=[]", "train.compare_corrections=[none]"]
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_train(compose_cfg([*quick, f"seed={seed}"]), tmp_path / name)
    a, b, c = (_weights(tmp_path / n / "model_hwa.pt") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_resumes_after_sigkill_from_the_last_checkpoint(tmp_path):
    overrides = [
        "logger=none",
        "train.progress=false",
        "train.epochs=12",
        "train.hwa_epochs=0",
        "dataset.limit_train=200",
        "train.compare_materials=[]",
        "train.compare_corrections=[none]",
        "threads=1",
    ]
    run_dir = tmp_path / "killed"
    ckpt = run_dir / "checkpoints" / "last.pt"
    proc = popen_app("train.py", [*overrides, f"hydra.run.dir={run_dir}"])
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "train.py ended before it could be killed"
    saved = load_checkpoint(ckpt)  # whole and readable, whatever moment the kill hit
    assert saved["phase"] == "digital" and 1 <= saved["epoch"] < 12
    assert [h["epoch"] for h in saved["history"]] == list(range(1, saved["epoch"] + 1))
    small_cnn().load_state_dict(saved["model"])

    resumed = run_app("train.py", [*overrides, f"hydra.run.dir={run_dir}"])
    after_kill = load_checkpoint(ckpt)["epoch"]
    assert after_kill == 12
    first_resumed = json.loads((run_dir / "results.json").read_text())["history"]
    assert [h["epoch"] for h in first_resumed] == list(range(1, 13))
    assert f"resuming digital training at epoch {saved['epoch'] + 1}/12" in resumed.stdout

    # the interrupted-and-resumed run ends with the weights of an uninterrupted one
    reference = tmp_path / "reference"
    threads = torch.get_num_threads()
    try:  # same thread count as the subprocess runs, so the same summation order
        run_train(compose_cfg(overrides), reference)
    finally:
        torch.set_num_threads(threads)
    got, want = _weights(run_dir / "model_digital.pt"), _weights(reference / "model_digital.pt")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_resuming_a_finished_phase_says_so_instead_of_epoch_n_plus_one(tmp_path, capsys):
    quick = [*TINY, "train.epochs=2", "train.hwa_epochs=0", "train.compare_materials=[]"]
    run_train(compose_cfg(quick), tmp_path)
    capsys.readouterr()
    run_train(compose_cfg(quick), tmp_path)  # resume=auto finds the finished checkpoint
    out = capsys.readouterr().out
    assert "digital training already finished" in out and "(2 epoch(s) done, 2 configured)" in out
    assert "epoch 3/2" not in out


def test_resume_from_a_foreign_checkpoint_fails_clearly(tmp_path):
    run_train(compose_cfg([*TINY, "train.epochs=2", "train.hwa_epochs=0"]), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    state["epoch"] = 1  # mid-way through the digital phase, of a model with other widths
    torch.save(state, tmp_path / "mid.pt")
    other = compose_cfg([*TINY, "model.channels=[8,8]", f"train.resume={tmp_path / 'mid.pt'}"])
    with pytest.raises(ValueError, match="does not fit this model"):
        run_train(other, tmp_path / "other")


def test_bad_train_settings_fail_early(tmp_path):
    with pytest.raises(ValueError, match=r"train\.epochs"):
        run_train(compose_cfg([*TINY, "train.epochs=-1"]), tmp_path)
    with pytest.raises(ValueError, match=r"dataset=imagenet is for eval\.py"):
        run_train(compose_cfg(["logger=none", "dataset=imagenet"]), tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train\.resume"):
        run_train(compose_cfg([*TINY, "train.resume=/no/such/last.pt"]), tmp_path)


@pytest.mark.slow
def test_default_run_trains_evaluates_and_logs_offline(tmp_path):
    run_dir = tmp_path / "default"
    proc = run_app("train.py", [f"hydra.run.dir={run_dir}"], timeout=1800)
    payload = json.loads((run_dir / "results.json").read_text())
    labels = [r["label"] for r in payload["rows"]]
    materials = ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"]
    modes = ["none", "first_order", "first_order_denoise"]
    assert labels[0] == "digital"
    assert labels[1:13] == [f"{m}/{c}" for m in materials for c in modes]
    assert labels[13:] == ["hwa:digital", *(f"hwa:taox_hfox/{c}" for c in modes)]
    assert payload["rows"][0]["top1"] > 0.9  # a trained digits CNN
    assert (run_dir / "results.png").stat().st_size > 0
    assert list((run_dir / "wandb").glob("offline-run-*"))  # wandb offline, inside the run dir
    assert "xbar util" in proc.stdout


def test_deploy_hook_runs_with_training_when_enabled(tmp_path):
    cfg = compose_cfg(
        [*TINY, "train.compare_materials=[]", "deploy=default", f"deploy.out_dir={tmp_path}/d"]
    )
    payload = run_train(cfg, tmp_path / "run")
    # 96 images in batches of 32: 3 steps per epoch, 2 digital + 1 hardware-aware epochs,
    # fewer than the hook's warm-up, so exactly the initial deployment, at step 1
    assert [(e["step"], e["reason"]) for e in payload["deploy_events"]] == [(1, "initial")]
    assert list((tmp_path / "d").rglob("*.yaml"))
    no_deploy = run_train(compose_cfg([*TINY, "train.compare_materials=[]"]), tmp_path / "off")
    assert no_deploy["deploy_events"] == []
