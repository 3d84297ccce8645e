"""Recompile rule (Eq. 14) truth table and the expected-performance prediction."""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from sedma_torch.deploy import (
    RHO,
    THETA,
    InProcessDeploymentMemory,
    expected_performance,
    should_recompile,
)


def test_constants_are_the_papers():
    assert (THETA, RHO) == (0.8, 0.85)


@pytest.mark.parametrize(
    ("current", "expected", "util", "fires", "reasons"),
    [
        (100.0, 100.0, 0.50, False, ()),  # healthy
        (79.0, 100.0, 0.50, True, ("performance",)),  # ratio 0.79 < 0.8
        (80.0, 100.0, 0.50, False, ()),  # ratio exactly 0.8: strict <
        (100.0, 100.0, 0.86, True, ("utilisation",)),  # util > 0.85
        (100.0, 100.0, 0.85, False, ()),  # util exactly 0.85: strict >
        (50.0, 100.0, 0.95, True, ("performance", "utilisation")),  # both
        (50.0, None, 0.50, False, ()),  # no history: only utilisation counts
        (50.0, None, 0.90, True, ("utilisation",)),
        (150.0, 100.0, 0.10, False, ()),  # better than expected
        (0.0, 100.0, 0.0, True, ("performance",)),  # stalled
    ],
)
def test_truth_table(current, expected, util, fires, reasons):
    decision = should_recompile(current, expected, util)
    assert bool(decision) is fires
    assert decision.reasons == reasons
    if expected is not None:
        assert decision.performance_ratio == pytest.approx(current / expected)


def test_custom_thresholds():
    assert should_recompile(90, 100, 0.5, theta=0.95)
    assert not should_recompile(90, 100, 0.7, rho=0.75)
    assert should_recompile(90, 100, 0.8, rho=0.75)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((float("nan"), 1.0, 0.5), "current_perf"),
        ((1.0, 0.0, 0.5), "expected_perf must be > 0"),
        ((1.0, 1.0, 1.5), "resource_util"),
        ((-1.0, 1.0, 0.5), "current_perf must be >= 0"),
    ],
)
def test_bad_inputs_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        should_recompile(*args)


def test_expected_performance_is_median_of_newest_k():
    rng = np.random.default_rng(3)
    values = rng.uniform(10, 100, 30).tolist()
    memory = InProcessDeploymentMemory()
    for v in values:
        memory.record_deployment("p", {"a": "n0"}, v)
    history = memory.deployment_history("p")
    assert [r["performance"] for r in history] == values[::-1]  # newest first
    assert expected_performance(history, k=10) == pytest.approx(statistics.median(values[-10:]))
    assert expected_performance(memory.deployment_history("other")) is None
    assert len(memory.deployment_history("p", limit=5)) == 5
