"""The compiled Gaussian kernel against a NumPy reimplementation of its stream, and its
statistics."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from sedma_torch.rram import native_rng
from sedma_torch.rram.rng import NoiseSource

pytestmark = pytest.mark.skipif(
    not native_rng.available(), reason="no C compiler: the kernel falls back to torch"
)


def _np_h32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def np_stream(n: int, lo: int, hi: int) -> np.ndarray:
    """The documented stream in float64 NumPy: Box-Muller on hashed pair counters."""
    npairs = (n + 1) // 2
    with np.errstate(over="ignore"):
        i2 = np.arange(npairs, dtype=np.uint32) * np.uint32(2)
        a = _np_h32(_np_h32(i2 + np.uint32(lo)) ^ np.uint32(hi))
        b = _np_h32(_np_h32(i2 + np.uint32(1) + np.uint32(lo)) ^ np.uint32(hi))
    u1 = ((a >> np.uint32(8)).astype(np.float64) + 0.5) / 2**24
    u2 = (b >> np.uint32(8)).astype(np.float64) / 2**24
    r = np.sqrt(-2 * np.log(u1))
    cos = r * np.cos(2 * np.pi * u2)
    sin = r * np.sin(2 * np.pi * u2)
    return np.concatenate([cos[: n // 2], sin[: n // 2], cos[n // 2 :]])


@pytest.mark.parametrize("n", [2, 7, 1000, 4097])
def test_kernel_equals_numpy_reimplementation_of_the_stream(n):
    rng = np.random.default_rng(n)
    lo, hi = (int(v) for v in rng.integers(0, 2**31, size=2))
    got = native_rng.fill_normal_(torch.empty(n), lo, hi).numpy()
    want = np_stream(n, lo, hi)
    # float32 with vectorised logf/cosf; the sine from sqrt(1 - cos^2) is coarser near 0
    assert np.median(np.abs(got - want)) < 1e-6
    np.testing.assert_allclose(got, want, atol=3e-3, rtol=0)


def test_kernel_output_is_standard_normal_and_seeds_are_independent():
    a = native_rng.fill_normal_(torch.empty(400_001), 12345, 678).double().numpy()
    b = native_rng.fill_normal_(torch.empty(400_001), 12346, 678).double().numpy()
    for z in (a, b):
        assert abs(z.mean()) < 5 * (1 / np.sqrt(z.size))
        assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
        assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
        assert abs(scipy.stats.kurtosis(z)) < 0.05
    half = a.size // 2
    assert abs(np.corrcoef(a[:half], a[half : 2 * half])[0, 1]) < 0.01  # cos and sin halves
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.01  # neighbours
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.01  # keys one apart


def test_noise_source_uses_it_reproducibly_whatever_the_thread_count():
    threads = torch.get_num_threads()
    try:
        draws = []
        for count in (1, 2):
            torch.set_num_threads(count)
            draws.append(NoiseSource(99).randn((3, 70_000), torch.device("cpu"), torch.float32))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(draws[0], draws[1])
    again = NoiseSource(98).randn((3, 70_000), torch.device("cpu"), torch.float32)
    assert not torch.equal(again, draws[0])


def test_fill_rejects_tensors_it_cannot_fill():
    with pytest.raises(ValueError, match="float32"):
        native_rng.fill_normal_(torch.empty(10, dtype=torch.float64), 1, 2)
    with pytest.raises(ValueError, match="contiguous"):
        native_rng.fill_normal_(torch.empty(10, 4).t(), 1, 2)


@pytest.mark.parametrize(
    "env", [{"SEDMA_NATIVE_RNG": "0"}, {"CC": "false"}], ids=["switched_off", "no_compiler"]
)
def test_switching_it_off_or_a_failing_compiler_falls_back_to_torch(env, tmp_path):
    code = (
        "import torch; from sedma_torch.rram import native_rng; "
        "from sedma_torch.rram.rng import NoiseSource; "
        "assert not native_rng.available(); "
        "z = NoiseSource(1).randn((70000,), torch.device('cpu'), torch.float32); "
        "assert abs(float(z.std()) - 1) < 0.02"
    )
    env = {**os.environ, **env, "SEDMA_CACHE_DIR": str(tmp_path)}  # nothing built yet
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
