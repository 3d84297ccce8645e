"""ShortTermMemory: windows, means and EWMAs against NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sedma_torch.memory import ShortTermMemory


def _ewma_closed_form(x: np.ndarray, alpha: float) -> float:
    """EWMA seeded with the first value, in closed form:
    (1-a)^(n-1) x_0 + sum_{k>=1} a (1-a)^(n-1-k) x_k."""
    n = len(x)
    weights = alpha * (1.0 - alpha) ** np.arange(n - 2, -1, -1, dtype=np.float64)
    return float((1.0 - alpha) ** (n - 1) * x[0] + weights @ x[1:])


@pytest.mark.parametrize("window,n", [(1, 7), (10, 5), (100, 100), (100, 2537)])
def test_window_mean_and_values_match_numpy_over_the_last_window_values(window, n):
    rng = np.random.default_rng(window * 1000 + n)
    x = rng.normal(3.0, 2.0, size=n)
    stm = ShortTermMemory(window=window)
    for v in x:
        stm.update("error", v)
    tail = x[-window:]
    np.testing.assert_array_equal(np.array(stm.values("error")), tail)
    assert stm.count("error") == len(tail)
    assert stm.total_updates("error") == n
    assert stm.mean("error") == pytest.approx(float(np.mean(tail)), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 1.0])
def test_ewma_matches_the_closed_form_weighted_sum(alpha):
    rng = np.random.default_rng(int(alpha * 100))
    x = rng.exponential(1.0, size=300)
    stm = ShortTermMemory(window=20, ewma_alpha=alpha)
    for i, v in enumerate(x):
        stm.update("latency", v)
        if i in (0, 1, 19, 20, 299):
            assert stm.ewma("latency") == pytest.approx(_ewma_closed_form(x[: i + 1], alpha))


def test_running_mean_stays_exact_after_a_million_evictions_of_large_offsets():
    rng = np.random.default_rng(7)
    x = 1e9 + rng.normal(0.0, 1.0, size=1_000_000)
    stm = ShortTermMemory(window=100)
    for v in x.tolist():
        stm.update("k", v)
    assert stm.mean("k") == pytest.approx(math.fsum(x[-100:]) / 100, rel=0, abs=1e-6)


def test_keys_are_independent():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=50), rng.normal(size=80)
    stm = ShortTermMemory(window=30, ewma_alpha=0.2)
    for i in range(80):
        if i < 50:
            stm.update("a", a[i])
        stm.update("b", b[i])
    assert stm.mean("a") == pytest.approx(float(np.mean(a[-30:])))
    assert stm.mean("b") == pytest.approx(float(np.mean(b[-30:])))
    assert stm.ewma("a") == pytest.approx(_ewma_closed_form(a, 0.2))
    assert set(stm.keys()) == {"a", "b"} and "a" in stm and len(stm) == 2
    stm.clear("a")
    assert "a" not in stm and stm.count("a") == 0 and stm.values("a") == []


def test_accepts_numpy_and_torch_scalars():
    torch = pytest.importorskip("torch")
    stm = ShortTermMemory(window=3)
    stm.update("k", np.float32(1.5))
    stm.update("k", torch.tensor(2.5))
    stm.update("k", 2)
    assert stm.values("k") == [1.5, 2.5, 2.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected_and_leave_the_window_unchanged(bad):
    stm = ShortTermMemory(window=5)
    stm.update("err", 1.0)
    with pytest.raises(ValueError, match=r"'err'.*finite"):
        stm.update("err", bad)
    assert stm.values("err") == [1.0] and stm.ewma("err") == 1.0


def test_unknown_key_and_bad_arguments_give_clear_errors():
    stm = ShortTermMemory()
    with pytest.raises(KeyError, match="no values for key 'missing'"):
        stm.mean("missing")
    with pytest.raises(KeyError, match="missing"):
        stm.ewma("missing")
    with pytest.raises(ValueError, match="non-empty string"):
        stm.update("", 1.0)
    with pytest.raises(ValueError, match="window"):
        ShortTermMemory(window=0)
    with pytest.raises(ValueError, match="ewma_alpha"):
        ShortTermMemory(ewma_alpha=0.0)
    with pytest.raises(ValueError, match="ewma_alpha"):
        ShortTermMemory(ewma_alpha=1.5)
    with pytest.raises(TypeError, match="must be a real number"):
        stm.update("k", "fast")
