"""COCO box mAP: a thin wrapper on pycocotools' ``COCOeval`` with torchmetrics-style keys."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

# COCOeval.stats order for iouType="bbox"
STAT_KEYS = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)


def load_coco_api(ground_truth: Any) -> Any:
    """A ``pycocotools.coco.COCO`` from a COCO object, a dataset dict or a JSON path."""
    from pycocotools.coco import COCO

    if isinstance(ground_truth, COCO):
        return ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, dict):
            api = COCO()
            api.dataset = copy.deepcopy(ground_truth)
            api.createIndex()
            return api
        return COCO(str(ground_truth))


def _check_detection(i: int, det: dict) -> None:
    missing = {"image_id", "category_id", "bbox", "score"} - set(det)
    if missing:
        raise ValueError(f"coco_map: prediction {i} lacks {sorted(missing)}: {det!r}")
    bbox = det["bbox"]
    if len(bbox) != 4 or not all(np.isfinite(v) for v in bbox) or bbox[2] < 0 or bbox[3] < 0:
        raise ValueError(
            f"coco_map: prediction {i} bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0, "
            f"got {bbox!r}"
        )
    if not np.isfinite(det["score"]):
        raise ValueError(f"coco_map: prediction {i} score is not finite: {det['score']!r}")


def coco_map(
    ground_truth: Any,
    predictions: Sequence[dict],
    *,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """COCO bbox metrics of ``predictions`` against ``ground_truth``, fractions in [0, 1].

    Args:
        ground_truth: a ``pycocotools.coco.COCO``, a COCO dataset dict (``images``,
            ``annotations``, ``categories``) or the path of an ``instances_*.json``.
        predictions: COCO result records ``{"image_id", "category_id", "bbox": [x, y, w, h]
            (pixels, top-left corner and size), "score"}``.
        image_ids: evaluate on these images only (default: every ground-truth image).

    Returns ``map`` (AP averaged over IoU 0.50:0.05:0.95), ``map_50``, ``map_75``,
    ``map_small/medium/large``, ``mar_1/10/100`` and ``mar_small/medium/large``, computed
    by ``pycocotools.cocoeval.COCOeval`` (areas, crowd regions and max 100 detections per
    image as in the official evaluation). A metric with no ground truth to score is -1;
    with no predictions at all every metric is 0.
    """
    from pycocotools.cocoeval import COCOeval

    gt = load_coco_api(ground_truth)
    preds = list(predictions)
    for i, det in enumerate(preds):
        _check_detection(i, det)
    ids = sorted(gt.getImgIds()) if image_ids is None else sorted(int(i) for i in image_ids)
    unknown = sorted(set(ids) - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"coco_map: image ids {unknown[:10]} are not in the ground truth")
    stray = sorted({int(d["image_id"]) for d in preds} - set(ids))
    if stray:
        raise ValueError(
            f"coco_map: predictions for image ids {stray[:10]} outside the evaluated images"
        )
    if not preds:
        return dict.fromkeys(STAT_KEYS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(d, bbox=[float(v) for v in d["bbox"]]) for d in preds])
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.params.imgIds = ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {k: float(v) for k, v in zip(STAT_KEYS, evaluator.stats, strict=True)}


def xyxy_to_xywh(boxes: Any) -> np.ndarray:
    """(N, 4) corner boxes [x1, y1, x2, y2] -> COCO [x, y, width, height] (same units)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1)


def detections_to_coco(image_id: int, boxes: Any, labels: Any, scores: Any) -> list[dict[str, Any]]:
    """COCO result records for one image from xyxy ``boxes``, category ``labels``, ``scores``."""
    xywh = xyxy_to_xywh(boxes)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(xywh) == len(labels) == len(scores):
        raise ValueError(
            f"detections_to_coco: {len(xywh)} boxes, {len(labels)} labels, {len(scores)} scores"
        )
    return [
        {"image_id": int(image_id), "category_id": int(c), "bbox": b.tolist(), "score": float(s)}
        for b, c, s in zip(xywh, labels, scores, strict=True)
    ]


__all__ = ["STAT_KEYS", "coco_map", "detections_to_coco", "load_coco_api", "xyxy_to_xywh"]
