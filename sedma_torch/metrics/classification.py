"""Top-k accuracy, accumulated over batches."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int]) -> dict[int, int]:
    """Number of samples whose true class is among the k highest logits, for each k.

    Args:
        logits: (batch, classes) scores.
        target: (batch,) integer class indices in [0, classes).
        ks: the k values, each in 1..classes.

    Ties are broken by ``torch.topk`` (lower index first on CPU).
    """
    if logits.ndim != 2:
        raise ValueError(
            f"topk_correct: logits must be (batch, classes), got {tuple(logits.shape)}"
        )
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(
            f"topk_correct: target must be ({logits.shape[0]},) to match logits, got "
            f"{tuple(target.shape)}"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"topk_correct: target must hold integer class indices, got {target.dtype}")
    classes = logits.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= classes):
        raise ValueError(
            f"topk_correct: target holds class indices outside [0, {classes}): "
            f"min {int(target.min())}, max {int(target.max())}"
        )
    for k in ks:
        if not isinstance(k, int) or not 1 <= k <= classes:
            raise ValueError(f"topk_correct: k must be an int in 1..{classes}, got {k!r}")
    if not ks:
        return {}
    top = logits.topk(max(ks), dim=1).indices  # (batch, kmax), best first
    hit = top == target.to(top.device).unsqueeze(1)
    return {k: int(hit[:, :k].any(dim=1).sum()) for k in ks}


class TopKAccuracy:
    """Running top-k accuracy: ``update(logits, target)`` per batch, ``compute()`` at the end
    gives ``{"top1": fraction, "top5": fraction}`` (keys ``top{k}``; a k larger than the
    number of classes is left out, e.g. no top5 for a 3-class problem)."""

    def __init__(self, ks: Sequence[int] = (1, 5)) -> None:
        if not ks:
            raise ValueError("TopKAccuracy: ks must name at least one k")
        self.ks = tuple(ks)
        self.correct = dict.fromkeys(self.ks, 0)
        self.total = 0
        self.classes: int | None = None

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: logits (batch, classes), target (batch,) class indices."""
        if self.classes is None:
            self.classes = int(logits.shape[-1])
        elif logits.ndim == 2 and logits.shape[1] != self.classes:
            raise ValueError(
                f"TopKAccuracy.update: {logits.shape[1]} classes, earlier batches had "
                f"{self.classes}"
            )
        ks = [k for k in self.ks if k <= self.classes]
        for k, n in topk_correct(logits, target, ks).items():
            self.correct[k] += n
        self.total += int(target.shape[0])

    def compute(self) -> dict[str, float]:
        """``{"top{k}": fraction correct}`` over every sample added."""
        if self.total == 0 or self.classes is None:
            raise ValueError("TopKAccuracy.compute: no samples were added")
        return {f"top{k}": self.correct[k] / self.total for k in self.ks if k <= self.classes}


__all__ = ["TopKAccuracy", "topk_correct"]
