"""COCO mAP sanity check: ground-truth boxes as predictions must score mAP = AP50 = 1.0.

Reads a COCO split in the official layout (default: the 80-image subset in shared/data)
through :func:`sedma_torch.data.coco.build_coco`, turns every non-crowd target box back into
a COCO result with score 1, and scores it with pycocotools (``sedma_torch.metrics.coco``).
As a control that the metric can fail, it also scores the same boxes shifted right by 10%
of their width (IoU 0.9/1.1 = 0.82 with their ground truth: AP is 1 at the IoU thresholds
0.50..0.80 and 0 above, so mAP should be near 0.7).

With ``--weights`` it also evaluates torchvision's Faster R-CNN MobileNetV3-Large FPN
loaded from that local file, digital and converted to RRAM for each ``--rram`` preset.

    python scripts/coco_gt_check.py
    python scripts/coco_gt_check.py --weights fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sedma_torch.data.coco import build_coco
from sedma_torch.experiments.detection import evaluate_detection
from sedma_torch.experiments.results import mean_output_error
from sedma_torch.metrics.coco import coco_map, detections_to_coco
from sedma_torch.models.detection import fasterrcnn_mobilenet_v3
from sedma_torch.rram import convert_, preset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "coco-val2017-subset"


def target_predictions(dataset, shift: float = 0.0) -> list[dict]:
    """Non-crowd target boxes as score-1 results, optionally shifted by shift * width."""
    preds: list[dict] = []
    for _, target in dataset:
        keep = target["iscrowd"] == 0
        boxes = target["boxes"][keep].clone().double()
        dx = shift * (boxes[:, 2] - boxes[:, 0])
        boxes[:, 0] += dx
        boxes[:, 2] += dx
        labels = target["labels"][keep]
        preds += detections_to_coco(target["image_id"], boxes, labels, torch.ones(len(labels)))
    return preds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(DEFAULT_ROOT), help="COCO root (annotations/, val2017/)")
    p.add_argument("--limit", type=int, default=None, help="first N images only")
    p.add_argument("--weights", default=None, help="local torchvision detector weights (.pth)")
    p.add_argument("--rram", default="taox_hfox,corrected", help="presets for --weights runs")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    dataset = build_coco(args.root, limit=args.limit)
    ids = dataset.ids
    n_ann = sum(len(dataset.coco.imgToAnns.get(i, [])) for i in ids)
    print(f"{len(ids)} images, {n_ann} annotations from {dataset.ann_file}")
    rows = [
        (
            "ground truth as predictions",
            coco_map(dataset.coco, target_predictions(dataset), image_ids=ids),
        ),
        (
            "boxes shifted by 10% of width",
            coco_map(dataset.coco, target_predictions(dataset, 0.1), image_ids=ids),
        ),
    ]
    if args.weights is not None:
        model = fasterrcnn_mobilenet_v3(args.weights).to(args.device)
        digital = evaluate_detection(model, dataset, device=args.device, batch_size=args.batch_size)
        rows.append(("detector, digital", digital.metrics))
        for name in [n for n in args.rram.split(",") if n]:
            rram = convert_(fasterrcnn_mobilenet_v3(args.weights), preset(name)).to(args.device)
            res = evaluate_detection(rram, dataset, device=args.device, batch_size=args.batch_size)
            err = mean_output_error(digital.outputs, res.outputs)
            rows.append((f"detector, RRAM {name} (RPN rel. error {err:.3f})", res.metrics))
    print("\n| predictions | mAP@[.5:.95] | AP50 | AP75 | AR@100 |")
    print("|---|---:|---:|---:|---:|")
    for name, m in rows:
        print(
            f"| {name} | {m['map']:.4f} | {m['map_50']:.4f} | {m['map_75']:.4f} | {m['mar_100']:.4f} |"
        )
    gt = rows[0][1]
    ok = gt["map"] == 1.0 and gt["map_50"] == 1.0
    print("GT check:", "PASS (mAP = AP50 = 1.0)" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
