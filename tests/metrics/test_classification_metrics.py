"""Top-k accuracy against hand-computed values and torchmetrics."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

from sedma_torch.metrics.classification import TopKAccuracy, topk_correct


def test_topk_correct_hand_computed():
    logits = torch.tensor(
        [
            [0.1, 0.5, 0.2, 0.9],  # order 3, 1, 2, 0
            [2.0, 1.0, 0.0, -1.0],  # order 0, 1, 2, 3
            [0.0, 0.3, 0.2, 0.1],  # order 1, 2, 3, 0
        ]
    )
    target = torch.tensor([1, 0, 0])
    # sample 0: true class at rank 2; sample 1: rank 1; sample 2: rank 4
    assert topk_correct(logits, target, [1, 2, 3, 4]) == {1: 1, 2: 2, 3: 2, 4: 3}


def test_accumulated_batches_match_torchmetrics_on_random_data():
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(300, 20, generator=gen)
    target = torch.randint(0, 20, (300,), generator=gen)
    meter = TopKAccuracy((1, 5))
    for i in range(0, 300, 64):
        meter.update(logits[i : i + 64], target[i : i + 64])
    got = meter.compute()
    for k in (1, 5):
        ref = MulticlassAccuracy(num_classes=20, top_k=k, average="micro")(logits, target)
        assert got[f"top{k}"] == pytest.approx(float(ref), abs=1e-6)


def test_k_larger_than_classes_is_left_out():
    meter = TopKAccuracy((1, 5))
    meter.update(torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([2]))
    assert meter.compute() == {"top1": 1.0}


@pytest.mark.parametrize(
    ("logits", "target", "match"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), "logits"),
        (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), "target"),
        (torch.zeros(4, 3), torch.zeros(4), "integer"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), "outside"),
    ],
)
def test_bad_inputs_raise_naming_the_problem(logits, target, match):
    with pytest.raises((ValueError, TypeError), match=match):
        topk_correct(logits, target, [1])


def test_compute_without_samples_raises():
    with pytest.raises(ValueError, match="no samples"):
        TopKAccuracy().compute()
