"""The compiled write-verify kernel against a float64 NumPy reimplementation of the loop,
against the PyTorch path, and for the statistics of its cycle-to-cycle noise."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats
import torch

from sedma_torch.rram import native_program, programming
from sedma_torch.rram.materials import get_material
from sedma_torch.rram.programming import SeededDeviceVariation, program_conductances
from sedma_torch.rram.rng import seed_pair

needs_kernel = pytest.mark.skipif(
    not native_program.available(),
    reason="kernel unavailable (no C compiler or SEDMA_NATIVE_RNG=0): PyTorch path in use",
)

NONIDEAL = ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"]


def _np_hash32(x: np.ndarray) -> np.ndarray:
    """rng._hash32 on uint32 (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x2C1B3C6D)
    return x ^ (x >> np.uint32(16))


def _np_hash_normal_at(index: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The documented counter-based normal of element ``index`` (Box-Muller cosine), float64."""
    with np.errstate(over="ignore"):
        i2 = index.astype(np.uint32) * np.uint32(2)
        h1 = _np_hash32(_np_hash32(i2 + np.uint32(lo)) ^ np.uint32(hi))
        h2 = _np_hash32(_np_hash32(i2 + np.uint32(1) + np.uint32(lo)) ^ np.uint32(hi))
    u1 = ((h1 >> np.uint32(8)).astype(np.float64) + 0.5) / 2**24
    u2 = (h2 >> np.uint32(8)).astype(np.float64) / 2**24
    return np.sqrt(-2 * np.log(u1)) * np.cos(2 * np.pi * u2)


def _np_program(target, material, seeds, tolerance, initial=None, variation=None):
    """Write-and-verify in float64 NumPy, all cells at once: the nominal-curve controller,
    the cell's own curve, sqrt(n)-scaled cycle-to-cycle noise, clipping and verify."""
    g_min, g_range = material.g_min, material.g_range
    t = np.clip(target.astype(np.float64), g_min, material.g_max)
    index = np.arange(t.size)
    if variation is None:
        top, a_scale = np.full(t.size, material.g_max), np.ones(t.size)
    else:
        lo, hi = seed_pair(variation.seed)
        z = _np_hash_normal_at(2 * index, lo, hi)
        z2 = _np_hash_normal_at(2 * index + 1, lo, hi)
        top = g_min + g_range * np.maximum(1 + variation.sigma * z, 0.05)
        a_scale = np.maximum(1 + variation.sigma * z2, 0.05)
    tol = tolerance * g_range
    if initial is None:
        g = np.full(t.size, g_min)
        live = t > g_min + tol
    else:
        g = initial.astype(np.float64).copy()
        live = np.abs(g - t) > tol
    curves = {}
    for up, which, levels in (
        (True, "ltp", material.levels_ltp),
        (False, "ltd", material.levels_ltd),
    ):
        big_a = material.curve_a(which)
        curves[up] = (big_a, -np.expm1(-levels / big_a), float(levels))
    pulses = iterations = 0
    for lo, hi in seeds:
        if not live.any():
            break
        iterations += 1
        up = t > g
        a_nom = np.where(up, curves[True][0], curves[False][0])
        s_nom = np.where(up, curves[True][1], curves[False][1])
        levels = np.where(up, curves[True][2], curves[False][2])
        p_g = -a_nom * np.log1p(-s_nom * np.clip((g - g_min) / g_range, 0, 1))
        p_t = -a_nom * np.log1p(-s_nom * np.clip((t - g_min) / g_range, 0, 1))
        n = np.maximum(np.round(np.abs(p_t - p_g)), 1.0)
        a_cell = a_scale * a_nom
        s_cell = -np.expm1(-levels / a_cell)
        span = top - g_min
        p_cell = -a_cell * np.log1p(-np.clip((g - g_min) / span, 0, 1) * s_cell)
        p_next = np.minimum(np.maximum(p_cell + np.where(up, n, -n), 0), levels)
        g_next = -np.expm1(-p_next / a_cell) / s_cell * span + g_min
        g_next += (
            _np_hash_normal_at(index, int(lo), int(hi))
            * np.sqrt(n)
            * (material.sigma_c2c * g_range)
        )
        g_next = np.minimum(np.maximum(g_next, g_min), top)
        g = np.where(live, g_next, g)
        pulses += int(n[live].sum())
        live &= np.abs(g - t) > tol
    return g, pulses, iterations


def _seeds(seed: int, max_iters: int) -> np.ndarray:
    """The seed pairs program_conductances draws up front from a generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**31 - 1, (max_iters, 2), generator=gen, dtype=torch.int32).numpy()


def _targets(material, n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(material.g_min, material.g_max, n).astype(np.float32))


def _agree(a: torch.Tensor, b, material, atol: float = 1e-5) -> float:
    """Fraction of cells whose conductances agree within ``atol`` of the range."""
    diff = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    return float(np.mean(diff <= atol * material.g_range))


@needs_kernel
@pytest.mark.parametrize("name", NONIDEAL)
@pytest.mark.parametrize("start", ["erased", "programmed"])
def test_kernel_follows_numpy_reimplementation_of_the_loop_per_cell(name, start):
    material = get_material(name)
    n, tolerance, max_iters = 20_000, 0.01, 20
    target = _targets(material, n, seed=11)
    initial = None if start == "erased" else _targets(material, n, seed=12)
    spread = SeededDeviceVariation(987654321987, 0.05, material.g_min, material.g_range)
    got, stats = program_conductances(
        target,
        material,
        generator=torch.Generator().manual_seed(5),
        tolerance=tolerance,
        max_iters=max_iters,
        initial=initial,
        variation=spread,
    )
    want, pulses, iterations = _np_program(
        target.numpy(),
        material,
        _seeds(5, max_iters),
        tolerance,
        None if initial is None else initial.numpy(),
        spread,
    )
    # float32 vs float64: a cell leaves the common trajectory only where a pulse count or a
    # verify decision sits within rounding of its threshold
    assert _agree(got, want, material) > 0.995
    assert stats.pulses == pytest.approx(pulses, rel=2e-3)
    assert stats.iterations == iterations
    err = np.abs(want - np.clip(target.numpy(), material.g_min, material.g_max))
    assert 0.5 < stats.fraction_within_tolerance < 1  # partly converged: a real comparison
    assert stats.fraction_within_tolerance == pytest.approx(
        np.mean(err <= tolerance * material.g_range), abs=5e-3
    )
    assert stats.mean_abs_error == pytest.approx(err.mean() / material.g_range, rel=5e-3)


@needs_kernel
@pytest.mark.parametrize("name", NONIDEAL)
@pytest.mark.parametrize("start", ["erased", "programmed"])
def test_native_and_pytorch_paths_agree_per_cell_and_in_stats(name, start, monkeypatch):
    monkeypatch.setenv("SEDMA_COMPILE", "0")
    material = get_material(name)
    target = _targets(material, 30_000, seed=21).view(100, 300)
    initial = None if start == "erased" else _targets(material, 30_000, seed=22).view(100, 300)
    spread = SeededDeviceVariation(13579, material.sigma_d2d, material.g_min, material.g_range)
    runs = {}
    for path in ("native", "pytorch"):
        if path == "pytorch":
            monkeypatch.setattr(programming, "_native_eligible", lambda *args: False)
        gen = torch.Generator().manual_seed(9)
        g, stats = program_conductances(
            target, material, generator=gen, initial=initial, variation=spread
        )
        runs[path] = (g, stats, int(torch.randint(0, 2**62, (1,), generator=gen)))
    (g_n, s_n, next_n), (g_t, s_t, next_t) = runs["native"], runs["pytorch"]
    assert g_n.shape == g_t.shape == target.shape and g_n.dtype == torch.float32
    assert _agree(g_n.reshape(-1), g_t.reshape(-1), material) > 0.998
    assert s_n.cells == s_t.cells and s_n.iterations == s_t.iterations
    assert s_n.pulses == pytest.approx(s_t.pulses, rel=1e-4)
    assert s_n.fraction_within_tolerance == pytest.approx(s_t.fraction_within_tolerance, abs=1e-3)
    assert s_n.mean_abs_error == pytest.approx(s_t.mean_abs_error, rel=1e-3)
    assert next_n == next_t  # both paths consumed the generator identically


@needs_kernel
@pytest.mark.parametrize("name", ["epiram", "taox_hfox"])
def test_kernel_stats_match_numpy_recomputation_from_its_output(name):
    material = get_material(name)
    tolerance = 0.02
    rng = np.random.default_rng(31)
    target = torch.from_numpy(
        rng.uniform(-0.2 * material.g_max, 1.2 * material.g_max, 50_000).astype(np.float32)
    )
    got, stats = program_conductances(
        target,
        material,
        generator=torch.Generator().manual_seed(3),
        tolerance=tolerance,
        max_iters=3,
    )
    err = np.abs(
        got.double().numpy() - target.clamp(material.g_min, material.g_max).double().numpy()
    )
    within = np.mean(err <= tolerance * material.g_range * (1 + 1e-6))
    assert 0 < within < 1
    assert stats.cells == target.numel() and stats.iterations <= 3
    # the kernel measures |G - target| in float32: a cell may sit within rounding of the
    # tolerance, and the float32 errors average to the float64 ones within 1e-7
    assert stats.fraction_within_tolerance == pytest.approx(within, abs=2 / target.numel())
    assert stats.mean_abs_error == pytest.approx(err.mean() / material.g_range, rel=1e-7)
    assert stats.max_abs_error == pytest.approx(err.max() / material.g_range, rel=1e-6)


@needs_kernel
def test_one_write_adds_gaussian_noise_scaled_by_root_pulse_count():
    material = dataclasses.replace(get_material("alox_hfo2"), name="quiet", sigma_c2c=0.002)
    rng = np.random.default_rng(41)
    frac = rng.uniform(0.2, 0.8, 200_000)
    target = torch.from_numpy((material.g_min + frac * material.g_range).astype(np.float32))
    frac = (target.double().numpy() - material.g_min) / material.g_range  # as stored
    kwargs = dict(generator=torch.Generator().manual_seed(4), max_iters=1)
    noisy, stats = program_conductances(target, material, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(4)
    clean, clean_stats = program_conductances(target, material, programming_noise=False, **kwargs)
    big_a, levels = material.curve_a("ltp"), material.levels_ltp
    s = -np.expm1(-levels / big_a)
    p_star = -big_a * np.log1p(-s * frac)
    n = np.maximum(np.round(p_star), 1.0)
    assert stats.pulses == clean_stats.pulses == pytest.approx(n.sum(), rel=1e-4)
    z = (noisy.double().numpy() - clean.double().numpy()) / (
        material.sigma_c2c * material.g_range * np.sqrt(n)
    )
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.std() - 1) < 5 * np.sqrt(0.5 / z.size) + 1e-3  # + float32 rounding of g
    assert scipy.stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01  # neighbouring cells independent


@needs_kernel
def test_result_does_not_depend_on_thread_count_and_barely_on_block_size():
    material = get_material("taox_hfox")
    target = _targets(material, 300_000, seed=51)
    spread = SeededDeviceVariation(24680, 0.05, material.g_min, material.g_range)
    params = _params(material)
    seeds = torch.from_numpy(_seeds(8, 20))
    threads = torch.get_num_threads()
    results = []
    try:
        for count, block in ((1, 2048), (2, 2048), (2, 333)):
            torch.set_num_threads(count)
            out = torch.empty_like(target)
            res = native_program.write_verify_(
                out,
                target,
                seeds,
                params,
                g_max=material.g_max,
                stats_tolerance=0.01 * material.g_range,
                variation=spread,
                block=block,
            )
            results.append((out, res))
    finally:
        torch.set_num_threads(threads)
    (one, r1), (two, r2), (small, r3) = results
    assert torch.equal(one, two) and r1 == r2  # blocks and their combination are fixed
    # another block size moves cells between vector lanes and the scalar tail of a loop
    assert _agree(one, small, material) > 0.999
    assert r3.pulses == pytest.approx(r1.pulses, rel=1e-4) and r3.iterations == r1.iterations


@needs_kernel
def test_stored_device_variation_gives_the_seeded_cells_and_caps_them_at_own_gmax():
    material = dataclasses.replace(get_material("epiram"), name="spread", sigma_d2d=0.1)
    spread = SeededDeviceVariation(1122, 0.1, material.g_min, material.g_range)
    target = torch.full((40, 500), material.g_max, dtype=torch.float32)
    stored = spread.materialise(tuple(target.shape), "cpu", torch.float32)
    runs = [
        program_conductances(
            target,
            material,
            generator=torch.Generator().manual_seed(6),
            max_iters=5,
            variation=variation,
        )
        for variation in (spread, stored)
    ]
    (g_seeded, s_seeded), (g_stored, s_stored) = runs
    assert _agree(g_seeded, g_stored, material) > 0.999
    assert s_seeded.pulses == pytest.approx(s_stored.pulses, rel=1e-4)
    cell_gmax = stored.g_max.numpy()
    assert (g_stored.numpy() <= cell_gmax).all() and (g_stored.numpy() >= material.g_min).all()
    capped = cell_gmax < material.g_max - 0.01 * material.g_range
    assert 0.2 < capped.mean() < 0.8
    assert s_stored.fraction_within_tolerance <= 1 - capped.mean()


@needs_kernel
@pytest.mark.parametrize("name", NONIDEAL)
def test_reprogramming_within_tolerance_leaves_cells_untouched(name):
    material = get_material(name)
    target = _targets(material, 5000, seed=61)
    rng = np.random.default_rng(61)
    shift = rng.uniform(-0.9, 0.9, 5000).astype(np.float32) * 0.01 * material.g_range
    initial = (target + torch.from_numpy(shift)).clamp(material.g_min, material.g_max)
    got, stats = program_conductances(
        target, material, generator=torch.Generator().manual_seed(7), initial=initial
    )
    assert torch.equal(got, initial)
    assert stats.pulses == 0 and stats.iterations == 0
    assert stats.fraction_within_tolerance == 1.0


def _params(material, tolerance: float = 0.01) -> torch.Tensor:
    levels_ltp, levels_ltd = float(material.levels_ltp), float(material.levels_ltd)
    a_ltp, a_ltd = material.curve_a("ltp"), material.curve_a("ltd")
    return torch.tensor(
        [
            a_ltp,
            a_ltd,
            -np.expm1(-levels_ltp / a_ltp),
            -np.expm1(-levels_ltd / a_ltd),
            levels_ltp,
            levels_ltd,
            material.g_min,
            material.g_range,
            material.sigma_c2c * material.g_range,
            tolerance * material.g_range,
        ],
        dtype=torch.float32,
    )


@needs_kernel
@pytest.mark.parametrize(
    ("argument", "change"),
    [
        ("target", {"target": torch.zeros(100, dtype=torch.float64)}),
        ("out", {"out": torch.zeros(99)}),
        ("out", {"out": torch.zeros(20, 10).t()}),
        ("initial", {"initial": torch.zeros(101)}),
        ("params", {"params": torch.zeros(9)}),
        ("seeds", {"seeds": torch.zeros(20, 2, dtype=torch.int64)}),
        ("seeds", {"seeds": torch.zeros(20, 3, dtype=torch.int32)}),
        ("variation", {"variation": "spread"}),
        ("block", {"block": 0}),
        ("block", {"block": -5}),
        ("block", {"block": 2**62}),  # 36 bytes a cell: a size_t overflow in C
        ("block", {"block": 2048.0}),
        ("block", {"block": 2**25}),  # x (levels + 2) pulses overflows the int32 sum
        ("target", {"target": torch.zeros(100, device="meta")}),
        ("target", {"target": torch.zeros(200)[::2]}),
        ("out", {"out": torch.zeros(100, device="meta")}),
        ("out", {"out": torch.zeros(100, dtype=torch.float64)}),
        ("initial", {"initial": torch.zeros(100, dtype=torch.float64)}),
        ("initial", {"initial": torch.zeros(200)[::2]}),
        ("params", {"params": torch.zeros(2, 5)}),
        ("params", {"params": torch.full((10,), float("nan"))}),
        ("params", {"params": torch.zeros(20)[::2]}),
        ("seeds", {"seeds": torch.zeros(0, 2, dtype=torch.int32)}),
        ("seeds", {"seeds": torch.zeros(2, 20, dtype=torch.int32).t()}),
        ("seeds", {"seeds": [[1, 2]]}),
        ("g_max", {"g_max": float("nan")}),
        ("g_max", {"g_max": "1e-4"}),
        ("stats_tolerance", {"stats_tolerance": float("inf")}),
        ("variation.seed", {"variation": SeededDeviceVariation(1.5, 0.1, 1e-6, 1e-4)}),
        ("variation.sigma", {"variation": SeededDeviceVariation(1, float("nan"), 1e-6, 1e-4)}),
        (
            "variation.g_max",
            {"variation": programming.DeviceVariation(torch.ones(99), torch.ones(100))},
        ),
        (
            "variation.a_scale",
            {
                "variation": programming.DeviceVariation(
                    torch.ones(100), torch.ones(100, device="meta")
                )
            },
        ),
    ],
)
def test_bad_input_is_rejected_naming_the_argument(argument, change):
    material = get_material("epiram")
    args = dict(
        out=torch.zeros(100),
        target=torch.zeros(100),
        seeds=torch.zeros(20, 2, dtype=torch.int32),
        params=_params(material),
        g_max=material.g_max,
        stats_tolerance=0.01,
    )
    args.update(change)
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        native_program.write_verify_(**args)


@needs_kernel
def test_params_whose_curves_need_unbounded_pulses_are_rejected():
    # S >= 1 puts Gmax at an infinite pulse number: the pulse count of one step overflows
    params = _params(get_material("epiram"))
    params[2] = 1.0
    with pytest.raises(ValueError, match="params"):
        native_program.write_verify_(
            torch.zeros(100),
            torch.zeros(100),
            torch.zeros(20, 2, dtype=torch.int32),
            params,
            g_max=1e-4,
            stats_tolerance=0.01,
        )


@needs_kernel
def test_out_may_be_initial_but_must_not_share_memory_with_other_operands():
    material = get_material("epiram")
    target = _targets(material, 300, seed=3)
    seeds = torch.from_numpy(_seeds(4, 10))
    params = _params(material)
    kwargs = dict(g_max=material.g_max, stats_tolerance=0.01 * material.g_range)
    initial = torch.full((300,), material.g_min)
    separate = torch.empty(300)
    want = native_program.write_verify_(
        separate, target, seeds, params, initial=initial.clone(), **kwargs
    )
    got = native_program.write_verify_(initial, target, seeds, params, initial=initial, **kwargs)
    assert got == want and torch.equal(initial, separate)
    both = torch.zeros(400)
    with pytest.raises(ValueError, match="out must not share memory with target"):
        native_program.write_verify_(target, target, seeds, params, **kwargs)
    with pytest.raises(ValueError, match="out must not share memory with initial"):
        native_program.write_verify_(
            both[:300], target, seeds, params, initial=both[100:], **kwargs
        )


@needs_kernel
def test_no_cells_return_at_once():
    material = get_material("epiram")
    result = native_program.write_verify_(
        torch.empty(0),
        torch.empty(0),
        torch.zeros(20, 2, dtype=torch.int32),
        _params(material),
        g_max=material.g_max,
        stats_tolerance=0.01,
    )
    assert result == native_program.WriteVerifyResult(0, 0, 0, 0.0, 0.0)


def test_cell_limit_keeps_the_32_bit_noise_counters_collision_free(monkeypatch):
    # the counters are the cell index i (noise) and 2i, 2i + 1 (device spread), hashed as
    # 2 x counter (+ 1) in 32 bits: distinct for all cells up to MAX_CELLS
    assert 2 * (2 * native_program.MAX_CELLS - 1) + 1 < 2**32
    monkeypatch.setattr(native_program, "MAX_CELLS", 64)
    material = get_material("epiram")
    with pytest.raises(ValueError, match="cells exceed 64"):
        native_program.write_verify_(
            torch.empty(100),
            torch.zeros(100),
            torch.zeros(20, 2, dtype=torch.int32),
            _params(material),
            g_max=material.g_max,
            stats_tolerance=0.01,
        )


@pytest.mark.parametrize(
    ("env", "warns"),
    [({"SEDMA_NATIVE_RNG": "0"}, 0), ({"CC": "false", "SEDMA_NATIVE_RNG": "1"}, 1)],
    ids=["switched_off", "no_compiler"],
)
def test_switching_it_off_or_a_failing_compiler_falls_back_to_pytorch(env, warns, tmp_path):
    code = (
        "import warnings, torch\n"
        "from sedma_torch.rram import native_program\n"
        "from sedma_torch.rram.materials import get_material\n"
        "from sedma_torch.rram.programming import program_conductances\n"
        "torch.set_num_threads(1)\n"
        "m = get_material('taox_hfox')\n"
        "t = torch.linspace(m.g_min, m.g_max, 5000)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(2):\n"
        "        g, s = program_conductances(t, m, generator=torch.Generator().manual_seed(1))\n"
        "assert not native_program.available()\n"
        "print(sum('write-verify kernel' in str(w.message) for w in caught))\n"
        "assert s.fraction_within_tolerance > 0.5 and g.min() >= m.g_min\n"
    )
    env = {**os.environ, **env, "SEDMA_CACHE_DIR": str(tmp_path), "SEDMA_COMPILE": "0"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert int(result.stdout.split()[-1]) == warns  # a failed build warns once
