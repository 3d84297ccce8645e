"""COCO detection evaluation end to end on generated COCO data (tiny detectors, CPU)."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch
from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from sedma_torch.data.coco import build_coco
from sedma_torch.experiments.detection import evaluate_detection
from sedma_torch.experiments.results import mean_output_error
from sedma_torch.metrics.coco import STAT_KEYS
from sedma_torch.models.detection import fasterrcnn_mobilenet_v3, load_state_dict_file
from sedma_torch.rram import RRAMConfig, convert_
from tests.conftest import REPO
from tests.data.test_coco_data import make_coco_fixture


def tiny_detector(seed: int = 0) -> nn.Module:
    """A randomly initialised two-conv Faster R-CNN that keeps every detection (score > 0)."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    backbone.out_channels = 8
    return FasterRCNN(
        backbone,
        num_classes=None,
        min_size=64,
        max_size=96,
        rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], output_size=4, sampling_ratio=2),
        box_head=TwoMLPHead(8 * 4 * 4, 16),
        box_predictor=FastRCNNPredictor(16, 91),
        rpn_pre_nms_top_n_test=50,
        rpn_post_nms_top_n_test=20,
        box_score_thresh=0.0,
    ).eval()


def key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


class OracleDetector(nn.Module):
    """Returns the ground-truth boxes of each (known) image with score 1."""

    def __init__(self, dataset):
        super().__init__()
        self.truth = {}
        for image, target in dataset:
            keep = target["iscrowd"] == 0
            self.truth[key(image)] = (target["boxes"][keep], target["labels"][keep])

    def forward(self, images):
        out = []
        for image in images:
            boxes, labels = self.truth[key(image)]
            out.append({"boxes": boxes, "labels": labels, "scores": torch.ones(len(labels))})
        return out


@pytest.fixture
def coco(tmp_path):
    make_coco_fixture(tmp_path, n_images=4, seed=3)
    return build_coco(tmp_path)


def test_ground_truth_detector_scores_map_one(coco):
    res = evaluate_detection(OracleDetector(coco), coco, batch_size=3, progress=False)
    assert res.metrics["map"] == pytest.approx(1.0) and res.metrics["map_50"] == pytest.approx(1.0)
    assert res.n_samples == 4 and res.outputs == []  # no RPN / backbone to record


def test_targets_of_a_plain_list_serve_as_ground_truth(coco):
    items = [coco[i] for i in range(len(coco))]
    res = evaluate_detection(OracleDetector(coco), items, batch_size=2, progress=False)
    assert res.metrics["map"] == pytest.approx(1.0)


def test_tiny_detector_runs_with_limit_and_records_rpn_objectness(coco):
    res = evaluate_detection(tiny_detector(), coco, batch_size=2, limit=3, progress=False)
    assert res.n_samples == 3 and set(res.metrics) == set(STAT_KEYS)
    assert all(-1.0 <= v <= 1.0 for v in res.metrics.values())
    assert [o.shape[0] for o in res.outputs] == [2, 1]
    assert res.outputs[0].shape[1] > 0 and all(torch.isfinite(o).all() for o in res.outputs)


def test_rram_detector_exact_when_ideal_and_noisy_otherwise(coco):
    digital = evaluate_detection(tiny_detector(), coco, batch_size=2, progress=False)
    ideal = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
    exact = convert_(tiny_detector(), ideal, progress=False)
    assert sum(type(m).__name__ == "RRAMConv2d" for m in exact.modules()) == 5
    res = evaluate_detection(exact, coco, batch_size=2, progress=False)
    assert mean_output_error(digital.outputs, res.outputs) < 1e-5
    noisy = convert_(tiny_detector(), RRAMConfig(material="taox_hfox"), progress=False)
    res = evaluate_detection(noisy, coco, batch_size=2, progress=False)
    assert 1e-4 < mean_output_error(digital.outputs, res.outputs) < 1.0
    assert set(res.metrics) == set(STAT_KEYS)


def test_bad_arguments_are_rejected(coco):
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_detection(tiny_detector(), coco, batch_size=0)
    with pytest.raises(ValueError, match="limit"):
        evaluate_detection(tiny_detector(), coco, limit=0)


def test_missing_detector_weights_name_the_path_and_the_torchvision_file(tmp_path):
    path = tmp_path / "fasterrcnn.pth"
    with pytest.raises(FileNotFoundError) as info:
        fasterrcnn_mobilenet_v3(path)
    msg = str(info.value)
    assert str(path) in msg and "fasterrcnn_mobilenet_v3_large_fpn" in msg
    assert "COCO_V1" in msg and "model.weights" in msg


def test_weight_files_unwrap_checkpoints_and_reject_non_state_dicts(tmp_path):
    sd = {"a.weight": torch.randn(3, 2), "a.bias": torch.randn(3)}
    torch.save({"model": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    loaded = load_state_dict_file(tmp_path / "ckpt.pth")
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_state_dict_file(tmp_path / "list.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict_file(tmp_path / "junk.pth")


@pytest.mark.slow
def test_detector_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    sd = fasterrcnn_mobilenet_v3(min_size=64, max_size=96).state_dict()
    torch.save(sd, tmp_path / "sd.pth")
    loaded = fasterrcnn_mobilenet_v3(tmp_path / "sd.pth")
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, sd[k])
    with pytest.raises(ValueError, match="num_classes=5"):
        fasterrcnn_mobilenet_v3(tmp_path / "sd.pth", num_classes=5)


@pytest.mark.slow
def test_mobilenet_detector_evaluates_generated_coco(coco):
    model = fasterrcnn_mobilenet_v3(min_size=64, max_size=96, box_score_thresh=0.0)
    res = evaluate_detection(model, coco, batch_size=2, progress=False)
    assert res.n_samples == 4 and set(res.metrics) == set(STAT_KEYS)
    assert len(res.outputs) == 2 and all(torch.isfinite(o).all() for o in res.outputs)


def test_gt_check_script_gives_one_on_the_real_subset(shared_data, capsys):
    spec = importlib.util.spec_from_file_location(
        "coco_gt_check", REPO / "scripts" / "coco_gt_check.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--root", str(shared_data / "coco-val2017-subset"), "--limit", "12"]) == 0
    out = capsys.readouterr().out
    assert "| ground truth as predictions | 1.0000 | 1.0000 |" in out
    assert "GT check: PASS" in out
