"""The embedded digits dataset: sklearn's real images, a fixed seeded split."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from sedma_torch.data.digits import load_digits_split


def test_split_is_the_seeded_permutation_of_sklearn_digits():
    train, test = load_digits_split()
    data = load_digits()
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0)).numpy()
    x_train = train.tensors[0]
    x_test, y_test = test.tensors
    assert x_train.shape == (1400, 1, 8, 8) and x_test.shape == (397, 1, 8, 8)
    np.testing.assert_allclose(x_train[:, 0].numpy(), data.images[perm[:1400]] / 16.0)
    np.testing.assert_array_equal(y_test.numpy(), data.target[perm[1400:]])
    assert float(x_train.min()) == 0.0 and float(x_train.max()) == 1.0


def test_split_is_disjoint_and_deterministic():
    a_train, a_test = load_digits_split(test_size=300, seed=3)
    b_train, _ = load_digits_split(test_size=300, seed=3)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    rows = {tuple(r) for r in a_train.tensors[0].reshape(-1, 64).tolist()}
    test_rows = [tuple(r) for r in a_test.tensors[0].reshape(-1, 64).tolist()]
    # digits has a few duplicate images; the split itself is by index, so compare counts
    assert len(a_train) + len(a_test) == 1797
    assert sum(r in rows for r in test_rows) < 10


def test_limit_train_and_bad_arguments():
    train, test = load_digits_split(limit_train=50)
    assert len(train) == 50 and len(test) == 397
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(test_size=0)
    with pytest.raises(ValueError, match="limit_train"):
        load_digits_split(limit_train=-1)
