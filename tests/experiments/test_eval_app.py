"""eval.py end to end on a real-format ImageNet folder built at test time, and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from sedma_torch.experiments import run_eval
from sedma_torch.models.small_cnn import small_cnn

from .helpers import compose_cfg, run_app, runs_under

# standard class indices of the imagenet_folder fixture's images, in sample order
LABELS = [1, 1, 499, 499, 999, 999]
LEVELS = [20, 60, 100, 140, 180, 220]


def _tiny_imagenet_model(path, seed: int = 0):
    """A random-init small CNN for 3x8x8 inputs and 1,000 classes, saved to ``path``."""
    torch.manual_seed(seed)
    model = small_cnn(num_classes=1000, in_channels=3).eval()
    torch.save(model.state_dict(), path)
    return model


def _expected_top1(model, indices) -> float:
    # uniform grey JPEGs stay uniform through resize/crop: the input is level/255 (+- JPEG)
    with torch.no_grad():
        x = torch.stack([torch.full((3, 8, 8), LEVELS[i] / 255) for i in indices])
        pred = model(x).argmax(1).tolist()
    return sum(p == LABELS[i] for p, i in zip(pred, indices, strict=True)) / len(indices)


def _overrides(root, weights, extra=()) -> list[str]:
    return [
        "dataset=imagenet",
        f"dataset.root={root}",
        "dataset.num_workers=0",
        "model=small_cnn",
        f"model.weights={weights}",
        "model.num_classes=1000",
        "model.in_channels=3",
        "+model.preprocess={image_size: 8, resize_size: 8, mean: [0, 0, 0], std: [1, 1, 1]}",
        "logger=none",
        "eval.progress=false",
        *extra,
    ]


def test_eval_app_multirun_over_rram_group(tmp_path, imagenet_folder):
    weights = tmp_path / "tiny.pt"
    model = _tiny_imagenet_model(weights)
    sweep = tmp_path / "sweep"
    proc = run_app(
        "eval.py",
        [
            "-m",
            *_overrides(imagenet_folder, weights, ["eval.limit=4", "threads=1"]),
            "rram=ideal,taox_hfox",
            f"hydra.sweep.dir={sweep}",
        ],
    )
    runs = runs_under(sweep)
    assert len(runs) == 2
    by_setting = {}
    for run in runs:
        payload = json.loads((run / "results.json").read_text())
        assert (run / "results.png").stat().st_size > 0
        assert payload["n_samples"] == 4 and payload["dataset_size"] == 6
        assert payload["limit"] == 4
        digital, rram = payload["rows"]
        assert digital["label"] == "digital"
        # evenly spaced subset of 4 of 6: samples 0, 1, 3, 4
        assert digital["top1"] == pytest.approx(_expected_top1(model, [0, 1, 3, 4]))
        by_setting[rram["label"]] = rram
    assert set(by_setting) == {"ideal", "taox_hfox"}
    ideal = by_setting["ideal"]
    assert ideal["mean_output_error"] < 1e-5 and ideal["crossbar_products"] > 0
    assert 0 < ideal["utilisation"] <= 1
    assert by_setting["taox_hfox"]["mean_output_error"] > 1e-3
    assert "4 of 6 samples" in proc.stdout and "taox_hfox" in proc.stdout


def test_eval_compares_several_settings_in_one_run(tmp_path, imagenet_folder):
    weights = tmp_path / "tiny.pt"
    model = _tiny_imagenet_model(weights, seed=1)
    cfg = compose_cfg(
        _overrides(
            imagenet_folder,
            weights,
            ["eval.rram_settings=[ideal,epiram]", "eval.corrections=[none,first_order]"],
        )
    )
    payload = run_eval(cfg, tmp_path / "run")
    labels = [r["label"] for r in payload["rows"]]
    assert labels == [
        "digital",
        "ideal/none",
        "ideal/first_order",
        "epiram/none",
        "epiram/first_order",
    ]
    rows = {r["label"]: r for r in payload["rows"]}
    assert rows["digital"]["top1"] == pytest.approx(_expected_top1(model, range(6)))
    # first-order correction reads each crossbar three times
    assert (
        rows["epiram/first_order"]["crossbar_products"]
        == 3 * rows["epiram/none"]["crossbar_products"]
    )
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [r["label"] for r in saved["rows"]] == labels


def test_missing_dataset_root_error(tmp_path):
    cfg = compose_cfg(["dataset=imagenet", "model=efficientnet_lite0", "logger=none"])
    with pytest.raises(ValueError, match=r"dataset.root is not set; pass dataset.root="):
        run_eval(cfg, tmp_path)
    cfg = compose_cfg(
        ["dataset=imagenet", f"dataset.root={tmp_path / 'nope'}", "model=resnet18", "logger=none"]
    )
    with pytest.raises(FileNotFoundError, match="nope"):
        run_eval(cfg, tmp_path)


def test_missing_torchvision_weights_error_names_the_cache_file(
    tmp_path, imagenet_folder, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    cfg = compose_cfg(
        ["dataset=imagenet", f"dataset.root={imagenet_folder}", "model=resnet50", "logger=none"]
    )
    with pytest.raises(FileNotFoundError) as err:
        run_eval(cfg, tmp_path / "run")
    assert str(tmp_path / "th" / "hub" / "checkpoints" / "resnet50-0676ba61.pth") in str(err.value)


def test_small_cnn_without_weights_says_where_to_get_them(tmp_path):
    cfg = compose_cfg(["logger=none"])
    with pytest.raises(FileNotFoundError, match=r"model_digital\.pt"):
        run_eval(cfg, tmp_path, outputs_dir=tmp_path / "outputs")  # no train.py run there


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        (["dataset=squad"], ValueError, "small_cnn is a classification model but dataset=squad"),
        (["+rram.tile_row=64"], ValueError, r"unknown RRAMConfig key\(s\) \['tile_row'\]"),
        (["rram.adc_bits=99"], ValueError, "adc_bits"),
        (["eval.limit=0"], ValueError, "eval.limit"),
        (["eval.rram_settings=[nope]"], ValueError, "nope"),
    ],
)
def test_bad_config_fails_early_naming_the_key(tmp_path, overrides, error, match):
    cfg = compose_cfg(["logger=none", "model.weights=/nonexistent.pt", *overrides])
    with pytest.raises(error, match=match):
        run_eval(cfg, tmp_path)


SECRET = "hunter2-Zq9"


def test_database_password_is_masked_in_everything_a_run_writes_and_prints(
    tmp_path, imagenet_folder
):
    # the password of memory.url reaches neither results.json's command, nor Hydra's
    # .hydra copies of the config, nor wandb's offline config and metadata, nor the output
    weights = tmp_path / "tiny.pt"
    _tiny_imagenet_model(weights)
    run_dir = tmp_path / "run"
    url = f"postgresql+psycopg://bob:{SECRET}@127.0.0.1:1/sedma"
    args = _overrides(imagenet_folder, weights, ["eval.limit=2", "threads=1"])
    args = [a for a in args if a != "logger=none"]
    proc = run_app(
        "eval.py",
        [
            *args,
            "logger=wandb",
            "memory.enabled=false",
            f"memory.url={url}",
            f"hydra.run.dir={run_dir}",
        ],
    )
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.parts[-2:] == (".hydra", "overrides.yaml") for p in written)
    assert any("wandb" in p.parts for p in written), "wandb wrote no offline files"
    leaks = [p for p in written if SECRET.encode() in p.read_bytes()]
    assert leaks == []
    assert SECRET not in proc.stdout + proc.stderr
    command = json.loads((run_dir / "results.json").read_text())["command"]
    assert "bob:***@127.0.0.1:1/sedma" in command


def test_invalid_memory_url_error_does_not_print_its_password(tmp_path):
    from sedma_torch.memory import LongTermMemory

    with pytest.raises(ValueError, match=r"bob:\*\*\*@") as err:
        LongTermMemory(f"postgresql+psycopg://bob:{SECRET}@db.example:notaport/sedma")
    assert SECRET not in str(err.value)
