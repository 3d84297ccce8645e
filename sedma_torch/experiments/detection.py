"""COCO detection evaluation of torchvision-style detectors (digital or RRAM-converted)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from sedma_torch.data.coco import collate
from sedma_torch.experiments.results import EvalResult
from sedma_torch.metrics.coco import coco_map, detections_to_coco, xyxy_to_xywh
from sedma_torch.progress import progress as _progress


def _coco_of(dataset: Any) -> Any | None:
    """The pycocotools ground truth of a COCO dataset, looking through Subset wrappers."""
    while dataset is not None:
        if hasattr(dataset, "coco"):
            return dataset.coco
        dataset = getattr(dataset, "dataset", None)
    return None


def ground_truth_from_targets(targets: list[tuple[tuple[int, int], dict]]) -> dict[str, Any]:
    """A COCO dataset dict from ``((height, width), target)`` pairs with xyxy ``boxes``.

    Used when the dataset carries no ``coco`` ground truth. Annotation areas are the
    target's ``area`` when present, else the box areas; ``iscrowd`` defaults to 0.
    """
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    categories: set[int] = set()
    for (height, width), target in targets:
        image_id = int(target["image_id"])
        images.append({"id": image_id, "height": int(height), "width": int(width)})
        boxes = xyxy_to_xywh(torch.as_tensor(target["boxes"]).cpu().numpy())
        labels = torch.as_tensor(target["labels"]).reshape(-1).tolist()
        area = target.get("area")
        crowd = target.get("iscrowd")
        for k, (box, label) in enumerate(zip(boxes, labels, strict=True)):
            categories.add(int(label))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "bbox": box.tolist(),
                    "area": float(area[k]) if area is not None else float(box[2] * box[3]),
                    "iscrowd": int(crowd[k]) if crowd is not None else 0,
                }
            )
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in sorted(categories)],
    }


class _RawOutputRecorder:
    """Forward hook keeping a comparable raw tensor per batch.

    Two-stage torchvision detectors (``model.rpn.head``): the RPN objectness logits of all
    FPN levels, flattened to ``(batch, anchors)``. Otherwise ``model.backbone``'s output
    (a tensor or a dict of feature maps), flattened to ``(batch, features)``. Models with
    neither record nothing.
    """

    def __init__(self, model: nn.Module):
        self.batches: list[torch.Tensor] = []
        self._current: torch.Tensor | None = None
        rpn_head = getattr(getattr(model, "rpn", None), "head", None)
        backbone = getattr(model, "backbone", None)
        self._handle: Any = None
        if isinstance(rpn_head, nn.Module):
            self._handle = rpn_head.register_forward_hook(self._rpn_hook)
        elif isinstance(backbone, nn.Module):
            self._handle = backbone.register_forward_hook(self._backbone_hook)

    def _keep(self, tensors: list[torch.Tensor]) -> None:
        self._current = torch.cat([t.detach().float().flatten(1) for t in tensors], 1).cpu()

    def _rpn_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        objectness, _ = output
        self._keep(list(objectness))

    def _backbone_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._keep(list(output.values()) if isinstance(output, dict) else [output])

    def end_batch(self) -> None:
        if self._current is not None:
            self.batches.append(self._current)
            self._current = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()


def evaluate_detection(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 2,
    limit: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
    ground_truth: Any = None,
) -> EvalResult:
    """COCO box mAP of a torchvision-style detector on ``dataset``.

    Args:
        model: called as ``model(list_of_images)`` in eval mode, returning per image a dict
            with ``boxes`` (N, 4) xyxy pixels of the input image, ``labels`` (N,) COCO
            category ids and ``scores`` (N,).
        dataset: items ``(image (3, H, W) float in [0, 1], target)`` with
            ``target["image_id"]``, e.g. :func:`sedma_torch.data.coco.build_coco`.
        limit: evaluate the first ``limit`` images; ``n_samples`` is the number evaluated.
        ground_truth: COCO ground truth (``COCO`` object, dict or JSON path); default the
            dataset's ``coco`` attribute, else one built from the dataset's targets.

    Returns an :class:`EvalResult` with the pycocotools metrics (``map``, ``map_50``,
    ``map_75``, ...; see :func:`sedma_torch.metrics.coco.coco_map`) and as ``outputs`` the
    RPN objectness logits (or backbone features) per batch.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if limit is not None:
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise ValueError(f"limit must be an int >= 1 or None, got {limit!r}")
        dataset = Subset(dataset, range(min(limit, len(dataset))))  # type: ignore[arg-type]
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("evaluate_detection: the dataset is empty")
    device = torch.device(device)
    gt = ground_truth if ground_truth is not None else _coco_of(dataset)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    recorder = _RawOutputRecorder(model)
    predictions: list[dict[str, Any]] = []
    seen: list[tuple[tuple[int, int], dict]] = []
    model.eval()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for images, targets in _progress(
                loader, desc="COCO eval", disable=not progress, leave=False
            ):
                detections = model([img.to(device) for img in images])
                recorder.end_batch()
                for img, target, det in zip(images, targets, detections, strict=True):
                    seen.append((tuple(img.shape[-2:]), target))
                    predictions.extend(
                        detections_to_coco(
                            int(target["image_id"]),
                            det["boxes"].float().cpu(),
                            det["labels"].cpu(),
                            det["scores"].float().cpu(),
                        )
                    )
    finally:
        recorder.close()
    seconds = time.perf_counter() - t0
    if gt is None:
        gt = ground_truth_from_targets(seen)  # type: ignore[arg-type]
    image_ids = [int(t["image_id"]) for _, t in seen]
    metrics = coco_map(gt, predictions, image_ids=image_ids)
    return EvalResult(metrics=metrics, n_samples=n, seconds=seconds, outputs=recorder.batches)


__all__ = ["evaluate_detection", "ground_truth_from_targets"]
