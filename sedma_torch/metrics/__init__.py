"""Task metrics: top-k accuracy, COCO box mAP (pycocotools), SQuAD exact match / F1."""

from .classification import TopKAccuracy, topk_correct
from .coco import coco_map, detections_to_coco
from .squad import exact_match, f1, squad_scores

__all__ = [
    "TopKAccuracy",
    "coco_map",
    "detections_to_coco",
    "exact_match",
    "f1",
    "squad_scores",
    "topk_correct",
]
