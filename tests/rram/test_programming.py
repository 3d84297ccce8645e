"""Write-and-verify programming against NumPy reimplementations of the NeuroSim curves."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq, minimize_scalar

from sedma_torch.rram.materials import get_material
from sedma_torch.rram.programming import (
    ProgrammingStats,
    draw_device_variation,
    program_conductances,
)

NONIDEAL = ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"]
NL_SCALE_PUBLISHED = 8.0 * 1.26269


@functools.cache
def _reference_normalised_a(nl: float) -> float:
    """a(NL) found with SciPy: the a whose curve's largest gap to the diagonal is |NL|/scale."""

    def max_gap(log_a: float) -> float:
        a = math.exp(log_a)
        curve = lambda u: -((1 - math.exp(-u / a)) / (1 - math.exp(-1 / a)) - u)  # noqa: E731
        return -minimize_scalar(
            curve, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-12}
        ).fun

    target = abs(nl) / NL_SCALE_PUBLISHED
    log_a = brentq(lambda x: max_gap(x) - target, math.log(1e-3), math.log(1e6), xtol=1e-13)
    return math.copysign(math.exp(log_a), nl)


def _np_curve(p, big_a, levels, g_min, g_max):
    return (g_max - g_min) / (1 - np.exp(-levels / big_a)) * (1 - np.exp(-p / big_a)) + g_min


def _np_inverse(g, big_a, levels, g_min, g_max):
    frac = (g - g_min) / (g_max - g_min)
    return -big_a * np.log(1 - frac * (1 - np.exp(-levels / big_a)))


def _reference_a(material, which: str) -> float:
    levels = material.levels_ltp if which == "ltp" else material.levels_ltd
    nl = material.nl_ltp if which == "ltp" else material.nl_ltd
    return _reference_normalised_a(nl) * levels


def _targets(material, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(material.g_min, material.g_max, size=n))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ideal_material_programs_exactly_and_counts_moved_cells():
    material = get_material("ideal")
    rng = np.random.default_rng(0)
    target = rng.uniform(-0.5 * material.g_max, 1.5 * material.g_max, size=(40, 30))
    initial = rng.uniform(material.g_min, material.g_max, size=(40, 30))
    initial[:5] = np.clip(target[:5], material.g_min, material.g_max)  # already in tolerance
    got, stats = program_conductances(
        torch.from_numpy(target),
        material,
        generator=_generator(0),
        initial=torch.from_numpy(initial),
    )
    clipped = np.clip(target, material.g_min, material.g_max)
    moved = initial != clipped
    # a continuous device is set exactly; only cells whose value changes take a pulse
    np.testing.assert_array_equal(got.numpy(), clipped)
    assert 0 < moved.mean() < 1
    assert stats.pulses == int(moved.sum())
    assert stats.cells == target.size
    assert stats.fraction_within_tolerance == 1.0


# float64 runs the PyTorch loop; float32 on CPU the compiled kernel (native_program)
DTYPES = [torch.float64, torch.float32]
RTOL = {torch.float64: 1e-9, torch.float32: 2e-6}
ATOL = {torch.float64: 0.0, torch.float32: 1e-6}  # of Gmax - Gmin: float32 near Gmin


def _near_half(p: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Pulse counts whose rounding float32 arithmetic may take the other way."""
    return np.abs(np.abs(p - np.floor(p)) - 0.5) < (1e-3 if dtype == torch.float32 else 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NONIDEAL)
def test_single_noiseless_write_lands_on_curve_at_rounded_pulses(name, dtype):
    material = get_material(name)
    tolerance = 0.01
    target = _targets(material, 3000, seed=1).numpy()
    target[:20] = material.g_min + np.linspace(0, 0.009, 20) * material.g_range  # within tol
    target[20:30] = material.g_min + np.linspace(0.0105, 0.012, 10) * material.g_range
    target = torch.from_numpy(target).to(dtype).double().numpy()  # as the array holds it
    got, stats = program_conductances(
        torch.from_numpy(target).to(dtype),
        material,
        generator=_generator(1),
        tolerance=tolerance,
        max_iters=1,
        programming_noise=False,
    )
    big_a, levels = _reference_a(material, "ltp"), material.levels_ltp
    p_star = _np_inverse(target, big_a, levels, material.g_min, material.g_max)
    out_of_tol = np.abs(target - material.g_min) > tolerance * material.g_range
    pulses = np.where(out_of_tol, np.maximum(np.round(p_star), 1.0), 0.0)
    expected = _np_curve(np.minimum(pulses, levels), big_a, levels, material.g_min, material.g_max)
    sure = ~_near_half(p_star, dtype)
    assert sure.mean() > 0.99
    np.testing.assert_allclose(
        got.double().numpy()[sure],
        expected[sure],
        rtol=RTOL[dtype],
        atol=ATOL[dtype] * material.g_range,
    )
    assert (got.numpy()[:20] == got.numpy().dtype.type(material.g_min)).all()
    assert (pulses[20:30] >= 1).all()
    assert abs(stats.pulses - int(pulses.sum())) <= int((~sure).sum())
    assert stats.iterations == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NONIDEAL)
def test_single_noiseless_depression_from_gmax_follows_ltd_curve(name, dtype):
    material = get_material(name)
    target = _targets(material, 2000, seed=2).to(dtype).double().numpy()
    initial = torch.full((2000,), material.g_max, dtype=dtype)
    got, stats = program_conductances(
        torch.from_numpy(target).to(dtype),
        material,
        generator=_generator(2),
        max_iters=1,
        programming_noise=False,
        initial=initial,
    )
    big_a, levels = _reference_a(material, "ltd"), material.levels_ltd
    q_star = _np_inverse(target, big_a, levels, material.g_min, material.g_max)
    out_of_tol = np.abs(target - material.g_max) > 0.01 * material.g_range
    pulses = np.where(out_of_tol, np.maximum(np.round(levels - q_star), 1.0), 0.0)
    expected = _np_curve(
        np.maximum(levels - pulses, 0.0), big_a, levels, material.g_min, material.g_max
    )
    sure = ~_near_half(levels - q_star, dtype)
    assert sure.mean() > 0.99
    np.testing.assert_allclose(
        got.double().numpy()[sure],
        expected[sure],
        rtol=RTOL[dtype],
        atol=ATOL[dtype] * material.g_range,
    )
    assert abs(stats.pulses - int(pulses.sum())) <= int((~sure).sum())


def _np_stats(got: np.ndarray, target: np.ndarray, material, tolerance: float):
    err = np.abs(got - target)
    return (
        float(np.mean(err <= tolerance * material.g_range)),
        float(err.mean() / material.g_range),
        float(err.max() / material.g_range),
    )


@pytest.mark.parametrize("name", ["ag_asi", "alox_hfo2", "taox_hfox"])
def test_more_write_verify_iterations_reduce_error(name):
    material = get_material(name)
    target = _targets(material, 5000, seed=3)
    results = {}
    for iters in (1, 20):
        got, _ = program_conductances(target, material, generator=_generator(3), max_iters=iters)
        results[iters] = _np_stats(got.numpy(), target.numpy(), material, 0.01)
    within_1, mean_1, _ = results[1]
    within_20, mean_20, _ = results[20]
    assert within_20 > within_1 + 0.2
    assert mean_20 < 0.5 * mean_1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NONIDEAL)
def test_stats_match_numpy_recomputation(name, dtype):
    material = get_material(name)
    tolerance = 0.02
    target = _targets(material, 4000, seed=4).reshape(40, 100).to(dtype)
    got, stats = program_conductances(
        target, material, generator=_generator(4), tolerance=tolerance, max_iters=3
    )
    within, mean_err, max_err = _np_stats(
        got.double().numpy(), target.double().numpy(), material, tolerance
    )
    assert got.shape == target.shape
    assert stats.cells == target.numel()
    assert stats.iterations <= 3
    assert 0 < within < 1  # a partly converged array, so the comparison is not trivial
    assert stats.fraction_within_tolerance == pytest.approx(within, abs=1.5 / target.numel())
    assert stats.mean_abs_error == pytest.approx(mean_err, rel=RTOL[dtype])
    assert stats.max_abs_error == pytest.approx(max_err, rel=RTOL[dtype])


def test_merged_stats_match_numpy_over_concatenated_cells():
    material = get_material("alox_hfo2")
    t1, t2 = _targets(material, 1000, seed=5), _targets(material, 3000, seed=6)
    g1, s1 = program_conductances(t1, material, generator=_generator(5), max_iters=2)
    g2, s2 = program_conductances(t2, material, generator=_generator(6), max_iters=2)
    merged = s1.merge(s2)
    within, mean_err, max_err = _np_stats(
        np.concatenate([g1.numpy(), g2.numpy()]),
        np.concatenate([t1.numpy(), t2.numpy()]),
        material,
        0.01,
    )
    assert merged.cells == 4000
    assert merged.pulses == s1.pulses + s2.pulses
    assert merged.fraction_within_tolerance == pytest.approx(within, abs=1e-3)
    assert merged.mean_abs_error == pytest.approx(mean_err, rel=1e-9)
    assert merged.max_abs_error == pytest.approx(max_err, rel=1e-9)
    assert (
        ProgrammingStats(0, 0, 0, 1.0, 0.0, 0.0)
        .merge(ProgrammingStats(0, 0, 0, 1.0, 0.0, 0.0))
        .cells
        == 0
    )


@pytest.mark.parametrize("name", NONIDEAL)
def test_reprogramming_within_tolerance_applies_no_pulses(name):
    material = get_material(name)
    tolerance = 0.01
    target = _targets(material, 3000, seed=7).numpy()
    rng = np.random.default_rng(7)
    initial = np.clip(
        target + rng.uniform(-0.9, 0.9, size=target.shape) * tolerance * material.g_range,
        material.g_min,
        material.g_max,
    )
    got, stats = program_conductances(
        torch.from_numpy(target),
        material,
        generator=_generator(7),
        tolerance=tolerance,
        initial=torch.from_numpy(initial),
    )
    np.testing.assert_array_equal(got.numpy(), initial)
    assert stats.pulses == 0
    assert stats.iterations == 0
    assert stats.fraction_within_tolerance == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NONIDEAL)
def test_results_are_clipped_to_conductance_window(name, dtype):
    material = dataclasses.replace(get_material(name), name="noisy", sigma_c2c=0.3)
    rng = np.random.default_rng(8)
    target = rng.uniform(-material.g_max, 2 * material.g_max, size=5000)
    got, _ = program_conductances(
        torch.from_numpy(target).to(dtype), material, generator=_generator(8), max_iters=5
    )
    got = got.numpy()
    assert got.min() >= got.dtype.type(material.g_min)
    assert got.max() <= got.dtype.type(material.g_max)
    # the window is reached: targets beyond it end near the nearest bound
    assert np.isclose(got, material.g_min).any() and np.isclose(got, material.g_max).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_results_with_variation_stay_below_each_cells_gmax(dtype):
    material = dataclasses.replace(get_material("epiram"), name="spread", sigma_d2d=0.1)
    shape = (50, 60)
    variation = draw_device_variation(shape, material, _generator(9), dtype=dtype)
    target = torch.full(shape, 2 * material.g_max, dtype=dtype)
    got, _ = program_conductances(
        target, material, generator=_generator(9), max_iters=5, variation=variation
    )
    got, cell_gmax = got.numpy(), variation.g_max.numpy()
    assert (got <= cell_gmax).all()
    assert (got >= got.dtype.type(material.g_min)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_seed_same_result_different_seed_differs(dtype):
    material = get_material("taox_hfox")
    target = _targets(material, 4000, seed=10).reshape(80, 50).to(dtype)
    first, stats_first = program_conductances(target, material, generator=_generator(123))
    again, stats_again = program_conductances(target, material, generator=_generator(123))
    other, _ = program_conductances(target, material, generator=_generator(124))
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    assert stats_first == stats_again
    assert not np.array_equal(first.numpy(), other.numpy())


def test_draw_device_variation_has_material_spread():
    material = dataclasses.replace(get_material("taox_hfox"), name="spread", sigma_d2d=0.05)
    variation = draw_device_variation((300, 200), material, _generator(11), dtype=torch.float64)
    rel_range = (variation.g_max.numpy() - material.g_min) / material.g_range
    scale = variation.a_scale.numpy()
    n = rel_range.size
    # mean 1 and std sigma_d2d, within 5 standard errors
    assert abs(rel_range.mean() - 1) < 5 * 0.05 / math.sqrt(n)
    assert abs(scale.mean() - 1) < 5 * 0.05 / math.sqrt(n)
    assert rel_range.std() == pytest.approx(0.05, rel=0.05)
    assert scale.std() == pytest.approx(0.05, rel=0.05)
    assert abs(np.corrcoef(rel_range.ravel(), scale.ravel())[0, 1]) < 5 / math.sqrt(n)
    again = draw_device_variation((300, 200), material, _generator(11), dtype=torch.float64)
    np.testing.assert_array_equal(again.g_max.numpy(), variation.g_max.numpy())


def test_device_variation_caps_cells_with_low_gmax_out_of_tolerance():
    material = dataclasses.replace(get_material("epiram"), name="spread", sigma_d2d=0.1)
    tolerance = 0.01
    variation = draw_device_variation((4000,), material, _generator(12), dtype=torch.float64)
    target = torch.full((4000,), material.g_max, dtype=torch.float64)
    got, stats = program_conductances(
        target,
        material,
        generator=_generator(12),
        tolerance=tolerance,
        max_iters=5,
        programming_noise=False,
        variation=variation,
    )
    got, cell_gmax = got.numpy(), variation.g_max.numpy()
    capped = cell_gmax < material.g_max - tolerance * material.g_range
    assert 0.2 < capped.mean() < 0.8
    # capped cells are pushed to their own ceiling and still fail the verify
    np.testing.assert_allclose(got[capped], cell_gmax[capped], rtol=1e-9)
    assert (np.abs(got[capped] - material.g_max) > tolerance * material.g_range).all()
    assert np.ptp(got) > 0.1 * material.g_range  # the achievable maximum differs per cell
    within = np.abs(got - material.g_max) <= tolerance * material.g_range
    assert stats.fraction_within_tolerance == pytest.approx(within.mean(), abs=1e-3)
    assert stats.fraction_within_tolerance <= 1 - capped.mean()


def test_max_iters_below_one_rejected():
    material = get_material("epiram")
    with pytest.raises(ValueError, match="max_iters"):
        program_conductances(
            _targets(material, 10, seed=13), material, generator=_generator(13), max_iters=0
        )


def test_seeded_variation_is_normal_per_cell_and_independent_of_the_cells_evaluated():
    import scipy.stats

    from sedma_torch.rram.programming import SeededDeviceVariation

    material = get_material("taox_hfox")
    sigma = 0.05
    spread = SeededDeviceVariation(
        seed=1234, sigma=sigma, g_min=material.g_min, g_range=material.g_range
    )
    index = torch.arange(40_000)
    g_max, a_scale = spread.at(index, torch.float64)
    z_g = ((g_max.numpy() - material.g_min) / material.g_range - 1) / sigma
    z_a = (a_scale.numpy() - 1) / sigma
    for z in (z_g, z_a):  # relative sigma as specified; the 5 % floor is 19 sigma away
        assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z_g, z_a)[0, 1]) < 0.03  # the two properties are independent
    # a cell's properties do not depend on which other cells are evaluated with it
    subset = torch.tensor([39_999, 7, 12_345])
    g_sub, a_sub = spread.at(subset, torch.float64)
    assert torch.equal(g_sub, g_max[subset]) and torch.equal(a_sub, a_scale[subset])
    other, _ = SeededDeviceVariation(1235, sigma, material.g_min, material.g_range).at(
        index, torch.float64
    )
    assert not torch.equal(other, g_max)  # another chip, another spread
