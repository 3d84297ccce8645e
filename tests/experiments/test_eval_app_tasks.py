"""eval.py end to end on COCO and SQuAD files generated at test time in their official formats,
with small randomly initialised models (the ImageNet case is in test_eval_app.py)."""

from __future__ import annotations

import json

import torch

from sedma_torch.models.detection import fasterrcnn_mobilenet_v3
from sedma_torch.models.qa import build_qa
from tests.data.test_coco_data import make_coco_fixture
from tests.data.test_squad_data import squad_json, write

from .helpers import run_app
from .test_qa import TINY


def _results(run_dir) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_eval_app_on_a_generated_coco_folder(tmp_path):
    data, _ = make_coco_fixture(tmp_path / "coco", n_images=3, seed=7)
    torch.manual_seed(0)
    weights = tmp_path / "detector.pth"
    torch.save(fasterrcnn_mobilenet_v3(num_classes=91).state_dict(), weights)
    run = tmp_path / "run"
    proc = run_app(
        "eval.py",
        [
            "dataset=coco",
            f"dataset.root={tmp_path / 'coco'}",
            "model=fasterrcnn_mobilenet_v3",
            f"model.weights={weights}",
            "model.min_size=64",
            "model.max_size=96",
            "eval.rram_settings=[ideal]",
            "eval.batch_size=2",
            "eval.progress=false",
            "logger=none",
            "memory=none",
            "threads=1",
            f"hydra.run.dir={run}",
        ],
    )
    out = _results(run)
    assert out["task"] == "detection" and out["n_samples"] == len(data["images"]) == 3
    digital, ideal = out["rows"]
    assert {"map", "map_50"} <= set(digital) and 0.0 <= digital["map"] <= 1.0
    # the ideal crossbar computes the digital model exactly
    assert ideal["mean_output_error"] < 1e-4
    assert ideal["crossbar_products"] > 0 and 0 < ideal["utilisation"] <= 1
    assert "detection" in proc.stdout


def test_eval_app_on_a_generated_squad_file(tmp_path):
    path = write(tmp_path, squad_json("1.1"))
    n_questions = sum(
        len(p["qas"]) for a in json.loads(path.read_text())["data"] for p in a["paragraphs"]
    )
    torch.manual_seed(0)
    model, tokenizer = build_qa(config=TINY)
    ckpt = tmp_path / "qa"
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    run = tmp_path / "run"
    run_app(
        "eval.py",
        [
            "dataset=squad",
            f"dataset.path={path}",
            "dataset.max_length=64",
            "dataset.stride=16",
            "model=qa_checkpoint",
            f"model.path={ckpt}",
            "eval.rram_settings=[ideal,taox_hfox]",
            "eval.progress=false",
            "logger=none",
            "memory=none",
            "threads=1",
            f"hydra.run.dir={run}",
        ],
    )
    out = _results(run)
    assert out["task"] == "qa" and out["n_samples"] == n_questions
    _digital, ideal, taox = out["rows"]
    for row in out["rows"]:
        assert 0.0 <= row["exact_match"] <= 1.0 and 0.0 <= row["f1"] <= 1.0
    assert ideal["mean_output_error"] < 1e-4
    assert taox["mean_output_error"] > ideal["mean_output_error"]
