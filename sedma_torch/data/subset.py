"""Deterministic subsets for ``eval.limit``."""

from __future__ import annotations

from torch.utils.data import Dataset, Subset


def evenly_spaced_indices(total: int, limit: int | None) -> list[int]:
    """``limit`` indices spread evenly over ``range(total)`` (all of them when ``limit`` is
    None or >= total): index ``floor(i * total / limit)`` for i = 0..limit-1, so a subset of
    a class-sorted folder still covers the classes evenly."""
    if limit is None or limit >= total:
        return list(range(total))
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    return [i * total // limit for i in range(limit)]


def limit_dataset(dataset: Dataset, limit: int | None) -> Dataset:
    """``dataset`` itself, or the :func:`evenly_spaced_indices` subset of ``limit`` items."""
    total = len(dataset)  # type: ignore[arg-type]
    indices = evenly_spaced_indices(total, limit)
    return dataset if len(indices) == total else Subset(dataset, indices)


__all__ = ["evenly_spaced_indices", "limit_dataset"]
