"""Classification evaluation: top-k accuracy and raw logits over a dataset."""

from __future__ import annotations

import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.subset import limit_dataset
from ..metrics.classification import TopKAccuracy
from ..progress import progress as _progress
from .results import EvalResult


@torch.no_grad()
def evaluate_classification(
    model: nn.Module,
    dataset: Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    num_workers: int = 0,
    ks: tuple[int, ...] = (1, 5),
) -> EvalResult:
    """Top-k accuracy of ``model`` on ``dataset`` (items ``(input, class index)``).

    Args:
        model: maps a batch of inputs to logits (batch, classes); put in eval mode here.
        dataset: a map-style dataset.
        device: where the model runs (the model is moved there).
        batch_size: images per forward pass, >= 1.
        limit: evaluate ``limit`` samples spread evenly over the dataset (None: all).
        progress: show a tqdm bar.
        num_workers: DataLoader worker processes for decoding images.
        ks: which top-k accuracies to report (k above the class count is skipped).

    Returns an :class:`EvalResult` with ``metrics`` ``{"top1", "top5"}`` (fractions), the
    sample count, the seconds spent in the model's forward passes (data loading excluded)
    and the logits of every batch (CPU, float32).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = torch.device(device)
    subset = limit_dataset(dataset, limit)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    model.to(device).eval()
    meter = TopKAccuracy(ks)
    outputs: list[torch.Tensor] = []
    seconds = 0.0
    for inputs, target in _progress(loader, desc="evaluate", disable=not progress, leave=False):
        inputs = inputs.to(device)
        start = time.perf_counter()
        logits = model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - start
        logits = logits.float().cpu()
        meter.update(logits, torch.as_tensor(target))
        outputs.append(logits)
    return EvalResult(
        metrics=meter.compute(), n_samples=meter.total, seconds=seconds, outputs=outputs
    )


__all__ = ["evaluate_classification"]
