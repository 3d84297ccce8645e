"""The embedded default dataset: scikit-learn's bundled handwritten digits (no download).

1,797 real 8x8 grey-scale images of the digits 0-9 (UCI "optdigits" test set, shipped
inside scikit-learn). Pixels are 0..16 in the source; here they are scaled to [0, 1].
The split is a fixed seeded permutation, so every run sees the same train and test sets.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

DIGITS_SAMPLES = 1797


def load_digits_split(
    test_size: int = 397, *, seed: int = 0, limit_train: int | None = None
) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) datasets of (image (1, 8, 8) float in [0, 1], label int64).

    Args:
        test_size: images held out for testing, 1..1796 (default 397: 1,400 train images).
        seed: seed of the permutation that defines the split.
        limit_train: keep only the first this many training images (tests, quick runs).
    """
    from sklearn.datasets import load_digits

    if not isinstance(test_size, int) or not 1 <= test_size < DIGITS_SAMPLES:
        raise ValueError(
            f"load_digits_split: test_size must be an int in 1..{DIGITS_SAMPLES - 1}, "
            f"got {test_size!r}"
        )
    if limit_train is not None and (not isinstance(limit_train, int) or limit_train < 1):
        raise ValueError(
            f"load_digits_split: limit_train must be a positive int or None, got {limit_train!r}"
        )
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = perm[: len(x) - test_size], perm[len(x) - test_size :]
    if limit_train is not None:
        train_idx = train_idx[:limit_train]
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


__all__ = ["DIGITS_SAMPLES", "load_digits_split"]
