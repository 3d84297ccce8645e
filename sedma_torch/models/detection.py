"""torchvision detectors, built without any download; user weights from a local file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

TORCHVISION_WEIGHTS_URL = (
    "https://download.pytorch.org/models/fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth"
)


_WHERE_TO_GET = (
    "No pretrained COCO detector with a permissive licence installs offline, so the weights "
    "must come from you: on a machine with internet, download torchvision's Faster R-CNN "
    "MobileNetV3-Large FPN COCO weights "
    "(torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1, "
    f"file {TORCHVISION_WEIGHTS_URL}), or train your own with torchvision's detection "
    "reference scripts, copy the .pth file here and pass its path as "
    "model.weights=/path/to/fasterrcnn_mobilenet_v3_large_fpn-fb6a3cc7.pth. Nothing is "
    "downloaded at run time."
)


def _missing_weights_message(path: Path) -> str:
    return f"Detector weights not found at {str(path)!r}. {_WHERE_TO_GET}"


def missing_coco_weights_message() -> str:
    """What ``eval.py`` says for ``model=fasterrcnn_mobilenet_v3`` without ``model.weights``
    (a randomly initialised detector would score mAP 0)."""
    return (
        "model=fasterrcnn_mobilenet_v3 needs COCO detector weights and model.weights is not "
        "set (a randomly initialised detector scores mAP 0, so eval.py does not evaluate "
        f"one). {_WHERE_TO_GET}"
    )


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict (or a ``{"model": state_dict, ...}`` checkpoint) with weights_only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(_missing_weights_message(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"cannot read detector weights from {path} with torch.load(weights_only=True): {exc}"
        ) from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{path} does not hold a state dict (name -> tensor) or a checkpoint with a 'model' "
            "state dict"
        )
    return state


def fasterrcnn_mobilenet_v3(
    weights: str | Path | None = None, num_classes: int = 91, **kwargs: Any
) -> nn.Module:
    """torchvision ``fasterrcnn_mobilenet_v3_large_fpn``, in eval mode, never downloading.

    Args:
        weights: a local ``.pth`` state dict (e.g. torchvision's COCO_V1 file) or ``None``
            for random initialisation.
        num_classes: classes including background (91 = torchvision's COCO numbering, where
            labels are the COCO category ids).
        **kwargs: forwarded to torchvision's ``FasterRCNN`` (``min_size``, ``max_size``,
            ``box_score_thresh``, ``box_detections_per_img``, ...).
    """
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn

    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an int >= 2 (background included), got {num_classes!r}"
        )
    state = load_state_dict_file(weights) if weights is not None else None
    model = fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(
                f"the weights in {weights} do not fit fasterrcnn_mobilenet_v3_large_fpn with "
                f"num_classes={num_classes}: {str(exc)[:500]}"
            ) from exc
    return model.eval()


__all__ = [
    "TORCHVISION_WEIGHTS_URL",
    "fasterrcnn_mobilenet_v3",
    "load_state_dict_file",
    "missing_coco_weights_message",
]
