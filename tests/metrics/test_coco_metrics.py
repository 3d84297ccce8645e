"""COCO mAP wrapper against hand-computed average precision (pycocotools conventions)."""

from __future__ import annotations

import numpy as np
import pytest

from sedma_torch.metrics.coco import STAT_KEYS, coco_map, detections_to_coco, xyxy_to_xywh

# COCO interpolates precision at 101 recall points 0, 0.01, ..., 1; recall <= 0.5 covers 51.
R51 = 51 / 101


def two_box_ground_truth() -> dict:
    """One image, two 20x20 'cat' boxes (area 400, 'small')."""
    return {
        "images": [{"id": 7, "width": 100, "height": 100}],
        "annotations": [
            {
                "id": 1,
                "image_id": 7,
                "category_id": 3,
                "bbox": [5, 5, 20, 20],
                "area": 400.0,
                "iscrowd": 0,
            },
            {
                "id": 2,
                "image_id": 7,
                "category_id": 3,
                "bbox": [50, 50, 20, 20],
                "area": 400.0,
                "iscrowd": 0,
            },
        ],
        "categories": [{"id": 3, "name": "cat"}],
    }


def det(bbox, score):
    return {"image_id": 7, "category_id": 3, "bbox": bbox, "score": score}


# [50, 50, 20, 12.5] inside [50, 50, 20, 20]: IoU = 250 / 400 = 0.625, so it is a true
# positive at the IoU thresholds 0.50, 0.55, 0.60 and a false positive at 0.65 .. 0.95.
EXACT, PARTIAL = [5, 5, 20, 20], [50, 50, 20, 12.5]


def test_exact_box_ranked_first_and_iou_0625_box_give_hand_computed_ap():
    m = coco_map(two_box_ground_truth(), [det(EXACT, 0.9), det(PARTIAL, 0.8)])
    # t <= 0.6: both boxes found, AP 1. t >= 0.65: recall 0.5 at precision 1 -> AP 51/101.
    assert m["map_50"] == pytest.approx(1.0)
    assert m["map_75"] == pytest.approx(R51)
    assert m["map"] == pytest.approx((3 * 1.0 + 7 * R51) / 10)
    assert m["map_small"] == pytest.approx(m["map"])
    assert m["map_medium"] == -1 and m["map_large"] == -1  # no ground truth of those sizes
    assert m["mar_100"] == pytest.approx((3 * 1.0 + 7 * 0.5) / 10)
    assert m["mar_1"] == pytest.approx((3 * 0.5 + 7 * 0.5) / 10)  # one detection: 1 of 2 found


def test_false_positive_ranked_first_halves_precision_at_high_iou():
    m = coco_map(two_box_ground_truth(), [det(EXACT, 0.3), det(PARTIAL, 0.8)])
    # t >= 0.65: the first detection is a false positive, the second finds 1 of 2 boxes at
    # precision 1/2; interpolated precision 0.5 for recall <= 0.5 -> AP 0.5 * 51/101.
    assert m["map_50"] == pytest.approx(1.0)
    assert m["map_75"] == pytest.approx(0.5 * R51)
    assert m["map"] == pytest.approx((3 * 1.0 + 7 * 0.5 * R51) / 10)
    # mar_1 keeps only the top detection (the partial box): recall 0.5 for t <= 0.6, else 0
    assert m["mar_1"] == pytest.approx(3 * 0.5 / 10)


def random_ground_truth(rng: np.random.Generator, n_images=5, n_cats=4) -> dict:
    images, anns = [], []
    for i in range(n_images):
        w, h = int(rng.integers(80, 300)), int(rng.integers(80, 300))
        images.append({"id": 100 + i, "width": w, "height": h})
        for _ in range(int(rng.integers(1, 8))):
            bw, bh = rng.uniform(4, w / 2), rng.uniform(4, h / 2)
            x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": 100 + i,
                    "category_id": int(rng.integers(1, n_cats + 1)),
                    "bbox": [x, y, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, n_cats + 1)]
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ground_truth_as_predictions_scores_one(seed):
    gt = random_ground_truth(np.random.default_rng(seed))
    preds = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt["annotations"]
    ]
    m = coco_map(gt, preds)
    assert m["map"] == pytest.approx(1.0) and m["map_50"] == pytest.approx(1.0)
    assert m["mar_100"] == pytest.approx(1.0)


def test_image_ids_restrict_the_evaluation():
    gt = random_ground_truth(np.random.default_rng(3))
    first = [a for a in gt["annotations"] if a["image_id"] == 100]
    preds = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox")}, "score": 1.0} for a in first
    ]
    assert coco_map(gt, preds, image_ids=[100])["map"] == pytest.approx(1.0)
    assert coco_map(gt, preds)["map"] < 1.0  # the other images' boxes are missed


def test_no_predictions_score_zero_and_bad_predictions_are_rejected():
    gt = two_box_ground_truth()
    assert coco_map(gt, []) == dict.fromkeys(STAT_KEYS, 0.0)
    with pytest.raises(ValueError, match="lacks"):
        coco_map(gt, [{"image_id": 7, "bbox": EXACT, "score": 1.0}])
    with pytest.raises(ValueError, match="bbox must be"):
        coco_map(gt, [det([1, 2, -3, 4], 1.0)])
    with pytest.raises(ValueError, match="score is not finite"):
        coco_map(gt, [det(EXACT, float("nan"))])
    with pytest.raises(ValueError, match="outside the evaluated images"):
        coco_map(gt, [{**det(EXACT, 1.0), "image_id": 8}])
    with pytest.raises(ValueError, match="not in the ground truth"):
        coco_map(gt, [], image_ids=[8])


def test_box_conversion_round_trips_corner_to_size_format():
    xyxy = np.array([[1.0, 2.0, 4.0, 8.0], [0.0, 0.0, 0.5, 0.25]])
    np.testing.assert_allclose(xyxy_to_xywh(xyxy), [[1, 2, 3, 6], [0, 0, 0.5, 0.25]])
    recs = detections_to_coco(5, xyxy, [2, 9], [0.5, 0.25])
    assert recs[1] == {
        "image_id": 5,
        "category_id": 9,
        "bbox": [0.0, 0.0, 0.5, 0.25],
        "score": 0.25,
    }
    with pytest.raises(ValueError, match="2 boxes, 1 labels"):
        detections_to_coco(5, xyxy, [2], [0.5, 0.25])
