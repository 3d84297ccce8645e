"""Tikhonov denoising and lambda selection against dense NumPy/SciPy solves."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch

from sedma_torch.rram.correction import (
    denoise,
    difference_matrix,
    estimate_lambda,
    gcv_lambda,
    laplacian_eigenvalues,
)

LAMBDAS = [0.0, 1e-12, 1e-3, 1.0, 100.0]


def _np_difference_matrix(n: int) -> np.ndarray:
    """SPEC.md: L in R^{(n-1) x n}, L[i, i] = -1, L[i, i+1] = 1."""
    lmat = np.zeros((n - 1, n))
    for i in range(n - 1):
        lmat[i, i] = -1.0
        lmat[i, i + 1] = 1.0
    return lmat


def _dense_system(n: int, lam: float) -> np.ndarray:
    lmat = _np_difference_matrix(n)
    return np.eye(n) + lam * lmat.T @ lmat


def _dense_denoise(p: np.ndarray, lam) -> np.ndarray:
    """(I + lam L^T L)^-1 p along the last axis; lam a scalar or one value per batch row."""
    n = p.shape[-1]
    rows = p.reshape(-1, n).astype(np.float64)
    lams = np.broadcast_to(np.asarray(lam, dtype=np.float64), p.shape[:-1]).reshape(-1)
    out = np.empty_like(rows)
    for lam_i in np.unique(lams):
        pick = lams == lam_i
        out[pick] = np.linalg.solve(_dense_system(n, lam_i), rows[pick].T).T
    return out.reshape(p.shape)


def _smooth_rows(rng: np.random.Generator, batch: int, n: int) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)
    freq = rng.uniform(0.5, 2.0, size=(batch, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(batch, 1))
    return np.sin(2 * np.pi * freq * t + phase)


def test_difference_matrix_and_eigenvalues_match_numpy():
    for n in (2, 3, 7, 64):
        lmat = _np_difference_matrix(n)
        np.testing.assert_array_equal(difference_matrix(n).numpy(), lmat)
        laplacian = lmat.T @ lmat
        expected_diag = np.full(n, 2.0)
        expected_diag[[0, -1]] = 1.0
        np.testing.assert_array_equal(np.diag(laplacian), expected_diag)
        np.testing.assert_allclose(
            np.sort(laplacian_eigenvalues(n).numpy()), np.linalg.eigvalsh(laplacian), atol=1e-12
        )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("batch_shape", [(), (5,), (2, 3)])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_denoise_matches_dense_solve_float64(seed, batch_shape, lam):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 301)) if seed > 1 else seed + 2  # n = 2 and 3 always covered
    p = rng.normal(size=(*batch_shape, n)) * rng.uniform(0.1, 10)
    got = denoise(torch.from_numpy(p), lam)
    assert got.dtype == torch.float64 and got.shape == p.shape
    np.testing.assert_allclose(
        got.numpy(), _dense_denoise(p, lam), rtol=0, atol=1e-10 * np.abs(p).max()
    )


@pytest.mark.parametrize(
    ("dtype", "rel_tol"),
    [(torch.float32, 2e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)],
)
@pytest.mark.parametrize("lam", LAMBDAS)
def test_denoise_low_precision_matches_dense_solve_and_keeps_dtype(dtype, rel_tol, lam):
    rng = np.random.default_rng(100)
    p = torch.from_numpy(rng.normal(size=(4, 97)) * 3.0).to(dtype)
    got = denoise(p, lam)
    assert got.dtype == dtype and got.shape == p.shape
    p64 = p.to(torch.float64).numpy()  # the reference solves the rounded input exactly
    expected = _dense_denoise(p64, lam)
    np.testing.assert_allclose(
        got.to(torch.float64).numpy(), expected, rtol=0, atol=rel_tol * np.abs(p64).max()
    )


def test_denoise_matches_scipy_dct_filter():
    rng = np.random.default_rng(101)
    n, lam = 150, 3.0
    p = rng.normal(size=(7, n))
    eig = 2 - 2 * np.cos(np.pi * np.arange(n) / n)
    expected = scipy.fft.idct(
        scipy.fft.dct(p, type=2, norm="ortho", axis=-1) / (1 + lam * eig),
        type=2,
        norm="ortho",
        axis=-1,
    )
    np.testing.assert_allclose(denoise(torch.from_numpy(p), lam).numpy(), expected, atol=1e-12)


def test_denoise_with_lambda_per_batch_row_matches_dense_solve():
    rng = np.random.default_rng(102)
    p = rng.normal(size=(6, 40))
    lam = np.array([0.0, 1e-12, 1e-3, 1.0, 100.0, 7.5])
    got = denoise(torch.from_numpy(p), torch.from_numpy(lam))
    np.testing.assert_allclose(got.numpy(), _dense_denoise(p, lam), atol=1e-10)

    p3 = rng.normal(size=(2, 3, 25)).astype(np.float32)
    lam3 = rng.uniform(0, 10, size=(2, 3))
    got3 = denoise(torch.from_numpy(p3), torch.from_numpy(lam3))
    assert got3.dtype == torch.float32
    np.testing.assert_allclose(
        got3.numpy(), _dense_denoise(p3.astype(np.float64), lam3), atol=2e-5 * np.abs(p3).max()
    )


def test_denoise_of_single_sample_returns_input():
    rng = np.random.default_rng(103)
    p = torch.from_numpy(rng.normal(size=(4, 1)))
    np.testing.assert_array_equal(denoise(p, 5.0).numpy(), p.numpy())


def test_denoise_preserves_mean_and_smooths():
    # (I + lam L^T L) has the constant vector as eigenvector with eigenvalue 1
    rng = np.random.default_rng(104)
    p = rng.normal(size=(3, 80))
    y = denoise(torch.from_numpy(p), 10.0).numpy()
    np.testing.assert_allclose(y.mean(-1), p.mean(-1), atol=1e-12)
    assert (np.abs(np.diff(y, axis=-1)).sum(-1) < np.abs(np.diff(p, axis=-1)).sum(-1)).all()


def test_denoise_rejects_bad_input():
    with pytest.raises(TypeError):
        denoise(torch.arange(10), 1.0)
    with pytest.raises(TypeError):
        denoise(np.ones(10), 1.0)
    p = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    for bad in (-1.0, float("nan"), float("inf"), torch.tensor([1.0, -1e-9, 2.0])):
        with pytest.raises(ValueError, match="lam"):
            denoise(p, bad)
    with pytest.raises(ValueError):
        denoise(torch.tensor(1.0), 1.0)


def _brute_force_lambda(p: np.ndarray, ref: np.ndarray, grid) -> tuple[float, float]:
    mses = [np.mean((_dense_denoise(p, lam) - ref) ** 2) for lam in grid]
    best = int(np.argmin(mses))
    return float(grid[best]), float(mses[best])


@pytest.mark.parametrize("seed", range(4))
def test_estimate_lambda_matches_brute_force_grid_search(seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(20, 120))
    ref = _smooth_rows(rng, 8, n)
    p = ref + rng.uniform(0.02, 0.5) * rng.normal(size=ref.shape)
    grid = [0.0, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e3]
    lam, mse = estimate_lambda(torch.from_numpy(p), torch.from_numpy(ref), grid)
    expected_lam, expected_mse = _brute_force_lambda(p, ref, grid)
    assert lam == expected_lam
    assert lam > 0  # a smooth reference with noise wants smoothing
    assert mse == pytest.approx(expected_mse, rel=1e-9)


def test_estimate_lambda_default_grid_matches_brute_force():
    rng = np.random.default_rng(210)
    ref = _smooth_rows(rng, 5, 60)
    p = ref + 0.2 * rng.normal(size=ref.shape)
    grid = np.concatenate([[0.0], np.logspace(-4, 4, 41)])  # documented default grid
    lam, mse = estimate_lambda(torch.from_numpy(p), torch.from_numpy(ref))
    expected_lam, expected_mse = _brute_force_lambda(p, ref, grid)
    assert lam == pytest.approx(expected_lam, rel=1e-12)
    assert mse == pytest.approx(expected_mse, rel=1e-9)


def test_estimate_lambda_is_zero_for_non_smooth_reference():
    rng = np.random.default_rng(211)
    ref = rng.normal(size=(6, 50))  # independent outputs: nothing to smooth
    p = ref + 0.01 * rng.normal(size=ref.shape)
    grid = [0.0, 1e-4, 1e-2, 1.0, 100.0]
    lam, mse = estimate_lambda(torch.from_numpy(p), torch.from_numpy(ref), grid)
    expected_lam, expected_mse = _brute_force_lambda(p, ref, grid)
    assert lam == expected_lam
    assert mse == pytest.approx(expected_mse, rel=1e-9)
    # the best lambda is ~ sigma_noise^2 / (3 sigma_ref^2) ~ 3e-5: effectively zero
    assert lam <= 1e-4


def test_estimate_lambda_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        estimate_lambda(torch.zeros(3, 10), torch.zeros(3, 11))


def _dense_gcv(p: np.ndarray, lam: float) -> float:
    """n ||(I - H) p||^2 / tr(I - H)^2, H = (I + lam L^T L)^-1, averaged over rows."""
    n = p.shape[-1]
    residual_op = np.eye(n) - np.linalg.inv(_dense_system(n, lam))
    rows = p.reshape(-1, n)
    resid = np.sum((rows @ residual_op.T) ** 2, axis=-1)
    return float(np.mean(n * resid / np.trace(residual_op) ** 2))


@pytest.mark.parametrize("kind", ["smooth_plus_noise", "white_noise", "smooth"])
def test_gcv_scores_match_dense_computation(kind):
    rng = np.random.default_rng(300)
    smooth = _smooth_rows(rng, 4, 70)
    p = {
        "smooth_plus_noise": smooth + 0.3 * rng.normal(size=smooth.shape),
        "white_noise": rng.normal(size=smooth.shape),
        "smooth": smooth,
    }[kind]
    grid = [1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0, 1e3]
    lam, scores = gcv_lambda(torch.from_numpy(p), grid)
    expected = np.array([_dense_gcv(p, g) for g in grid])
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-8)
    assert lam == grid[int(np.argmin(expected))]


def test_gcv_picks_positive_lambda_that_reduces_error_on_noisy_smooth_signal():
    rng = np.random.default_rng(301)
    clean = _smooth_rows(rng, 8, 128)
    noisy = clean + 0.2 * rng.normal(size=clean.shape)
    lam, scores = gcv_lambda(torch.from_numpy(noisy))
    assert lam > 0
    assert scores[0] == float("inf")  # lambda = 0: GCV is 0/0
    denoised = denoise(torch.from_numpy(noisy), lam).numpy()
    assert np.mean((denoised - clean) ** 2) < 0.5 * np.mean((noisy - clean) ** 2)


def test_gcv_picks_smallest_positive_lambda_for_noise_free_smooth_signal():
    # No noise: any smoothing only removes signal, so GCV's minimum is the smallest lambda.
    rng = np.random.default_rng(302)
    smooth = _smooth_rows(rng, 3, 100)
    grid = [0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]
    lam, _ = gcv_lambda(torch.from_numpy(smooth), grid)
    assert lam == 1e-4


def test_gcv_picks_heavy_smoothing_for_pure_white_noise():
    # GCV models p = signal + white noise; for pure white noise the signal is the mean, so
    # the brute-force minimiser is the largest lambda (not ~0).
    rng = np.random.default_rng(303)
    p = rng.normal(size=(6, 90))
    grid = [1e-4, 1e-2, 1.0, 100.0, 1e4]
    lam, _ = gcv_lambda(torch.from_numpy(p), grid)
    expected = [_dense_gcv(p, g) for g in grid]
    assert lam == grid[int(np.argmin(expected))] == 1e4


def test_gcv_score_does_not_depend_on_position_of_zero_in_grid():
    rng = np.random.default_rng(304)
    smooth = _smooth_rows(rng, 4, 64)
    p = torch.from_numpy(smooth + 0.3 * rng.normal(size=smooth.shape))
    lam_first, scores_first = gcv_lambda(p, [0.0, 0.1, 1.0, 10.0])
    lam_last, scores_last = gcv_lambda(p, [10.0, 1.0, 0.1, 0.0])
    assert lam_first > 0
    assert lam_last == lam_first
    np.testing.assert_array_equal(scores_last.numpy(), scores_first.numpy()[::-1])
