"""The result record every evaluation routine returns (classification, detection, QA)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EvalResult:
    """What one evaluation pass over a dataset measured.

    ``metrics`` holds the task metrics (e.g. ``{"top1": .., "top5": ..}``,
    ``{"map": .., "map_50": ..}``, ``{"exact_match": .., "f1": ..}``), as fractions in
    [0, 1] unless the key says otherwise. ``outputs`` holds one CPU float tensor per batch
    of the model's raw outputs on the same inputs in the same order (logits; start/end
    logits for QA; for detection the backbone features or head logits), so that a digital
    and an RRAM run can be compared with :func:`mean_output_error`.
    """

    metrics: dict[str, float]
    n_samples: int
    seconds: float
    outputs: list[torch.Tensor] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.n_samples / self.seconds if self.seconds > 0 else float("nan")


def mean_output_error(reference: list[torch.Tensor], other: list[torch.Tensor]) -> float:
    """Mean over batches of ||other - reference||_2 / ||reference||_2 (relative L2 error)."""
    if len(reference) != len(other):
        raise ValueError(
            f"mean_output_error: {len(reference)} reference batches vs {len(other)} batches"
        )
    if not reference:
        return float("nan")
    errs = []
    for i, (r, o) in enumerate(zip(reference, other, strict=True)):
        if r.shape != o.shape:
            raise ValueError(
                f"mean_output_error: batch {i} shapes differ: {tuple(r.shape)} vs {tuple(o.shape)}"
            )
        r64, o64 = r.double(), o.double()
        errs.append(float((o64 - r64).norm() / r64.norm().clamp_min(1e-30)))
    return sum(errs) / len(errs)


__all__ = ["EvalResult", "mean_output_error"]
