"""Crossbar read path of the RRAM layers against independent NumPy/SciPy references.

Every reference here is written from the documented model (crossbar.py module docstring,
SPEC.md Layer 1), never from the code under test: dense products, per-tile DAC/ADC
quantisation, the read-noise variance formula, drift, stuck cells, and an exact nodal
solve of the resistive crossbar network for IR drop.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import scipy.sparse
import scipy.sparse.linalg
import scipy.stats
import torch

import sedma_torch as st
from sedma_torch.rram import Material, RRAMConfig, RRAMConv2d, RRAMLinear, register_material

IDEAL = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)
IDEAL_G_MIN, IDEAL_G_MAX = 1e-7, 1e-5  # the registered "ideal" device


# ----- independent NumPy references --------------------------------------------------------
def levels_of(bits: int) -> int:
    """Positive levels of a signed converter: 2^(bits-1) - 1, at least 1."""
    return max(2 ** (bits - 1) - 1, 1)


def input_tiles(n: int, tile_rows: int) -> list[slice]:
    return [slice(s, min(s + tile_rows, n)) for s in range(0, n, tile_rows)]


def tile_col_scale(w_tile: np.ndarray) -> np.ndarray:
    """Per output column |max| of a weight block (out, rows); 1 for an all-zero column."""
    scale = np.abs(w_tile).max(axis=1)
    return np.where(scale > 0, scale, 1.0)


def np_dac(x: np.ndarray, tile_rows: int, bits: int, dac_range: float | None = None):
    """DAC-quantised x (B, n): per input tile, scale = tile |max| (or dac_range)."""
    levels = levels_of(bits)
    out = np.zeros_like(x)
    for sl in input_tiles(x.shape[1], tile_rows):
        xt = x[:, sl]
        if dac_range is None:
            scale = np.maximum(np.abs(xt).max(axis=1, keepdims=True), np.finfo(x.dtype).tiny)
            codes = np.round(xt / scale * levels)
        else:
            scale = dac_range
            codes = np.clip(np.round(xt / scale * levels), -levels, levels)
        out[:, sl] = codes * scale / levels
    return out


def np_adc(u: np.ndarray, tile_cols: int, bits: int, full_scale: float | None = None):
    """Column ADC on (..., C): auto range = |max| per group of tile_cols columns, or a
    fixed full scale with saturation."""
    levels = levels_of(bits)
    out = np.empty_like(u)
    for c0 in range(0, u.shape[-1], tile_cols):
        group = u[..., c0 : c0 + tile_cols]
        if full_scale is None:
            full = np.maximum(np.abs(group).max(axis=-1, keepdims=True), 1e-30)
            step = full / levels
            out[..., c0 : c0 + tile_cols] = np.round(group / step) * step
        else:
            step = full_scale / levels
            out[..., c0 : c0 + tile_cols] = np.clip(np.round(group / step), -levels, levels) * step
    return out


def np_tiled_adc_product(
    x: np.ndarray,
    w: np.ndarray,
    tile_rows: int,
    tile_cols: int,
    adc_bits: int,
    adc_range: float | None = None,
    dac_bits: int | None = None,
) -> np.ndarray:
    """y (B, out) of x (B, in) and w (out, in) read tile by tile through DAC and ADC."""
    y = np.zeros((x.shape[0], w.shape[0]))
    for sl in input_tiles(x.shape[1], tile_rows):
        wt = w[:, sl]
        cs = tile_col_scale(wt)
        xt = x[:, sl]
        if dac_bits is None:
            x_norm, s_in = xt, np.ones((x.shape[0], 1))
        else:
            levels = levels_of(dac_bits)
            s_in = np.maximum(np.abs(xt).max(axis=1, keepdims=True), np.finfo(x.dtype).tiny)
            x_norm = np.round(xt / s_in * levels) / levels
        u = x_norm @ (wt / cs[:, None]).T
        y += np_adc(u, tile_cols, adc_bits, adc_range) * s_in * cs
    return y


def np_readback(layer: RRAMLinear, g_min: float, g_max: float) -> np.ndarray:
    """The (out, in) matrix the crossbar holds, from its stored conductances and the
    per-tile column scale computed from the digital weights."""
    w = layer.weight.detach().double().numpy()
    gp = layer.g_pos.double().numpy()  # (T, R, C)
    gn = layer.g_neg.double().numpy()
    t, r, _ = gp.shape
    norm = ((gp - gn) / (g_max - g_min)).reshape(t * r, -1)[: layer.in_features]
    scale = np.concatenate(
        [
            np.broadcast_to(tile_col_scale(w[:, sl]), (sl.stop - sl.start, w.shape[0]))
            for sl in input_tiles(layer.in_features, r)
        ]
    )
    return (norm * scale).T


def linear_layer(
    w: np.ndarray, cfg: RRAMConfig, device: torch.device | str = "cpu", bias: bool = False
) -> RRAMLinear:
    out_f, in_f = w.shape
    layer = RRAMLinear(in_f, out_f, bias=bias, config=cfg, device=device, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
    return layer


def run(layer: torch.nn.Module, x: np.ndarray, device: torch.device | str = "cpu") -> np.ndarray:
    with torch.no_grad():
        return layer(torch.from_numpy(x).to(device)).cpu().numpy()


def readonly_material(read_noise: float = 0.02) -> str:
    """Exactly programmable device whose only non-ideality is read noise."""
    register_material(
        Material(
            name="readonly_test",
            g_max=1e-5,
            g_min=1e-6,
            levels_ltp=None,
            levels_ltd=None,
            read_noise=read_noise,
        ),
        overwrite=True,
    )
    return "readonly_test"


def drift_material(nu: float) -> str:
    """Exactly programmable device whose only non-ideality is drift with one exponent."""
    register_material(
        Material(
            name="drift_test",
            g_max=1e-5,
            g_min=1e-6,
            levels_ltp=None,
            levels_ltd=None,
            drift_nu=nu,
            drift_nu_std=0.0,
        ),
        overwrite=True,
    )
    return "drift_test"


# ----- exact read path ------------------------------------------------------------------------
SHAPES = [  # in, out, tile_rows, tile_cols
    (7, 5, 3, 2),
    (64, 32, 16, 8),
    (100, 37, 32, 16),
    (1, 1, 4, 4),
    (300, 5, 256, 256),
    (45, 70, 45, 13),
]


@pytest.mark.parametrize(("n_in", "n_out", "tile_rows", "tile_cols"), SHAPES)
def test_ideal_config_linear_equals_dense_product(device, n_in, n_out, tile_rows, tile_cols):
    rng = np.random.default_rng(n_in * 1000 + n_out)
    w = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((9, n_in))
    cfg = IDEAL.replace(tile_rows=tile_rows, tile_cols=tile_cols)
    y = run(linear_layer(w, cfg, device), x, device)
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("n_in", "n_out", "tile_rows", "tile_cols"), SHAPES)
def test_ideal_config_mvm_equals_numpy_matmul(n_in, n_out, tile_rows, tile_cols):
    rng = np.random.default_rng(7 + n_in + n_out)
    a = rng.standard_normal((n_out, n_in))
    vec = rng.standard_normal(n_in)
    block = rng.standard_normal((n_in, 4))
    cfg = IDEAL.replace(tile_rows=tile_rows, tile_cols=tile_cols)
    y_vec = st.rram.mvm(a, vec, cfg).y.numpy()
    y_block = st.rram.mvm(a, block, cfg).y.numpy()
    assert y_vec.shape == (n_out,)
    assert y_block.shape == (n_out, 4)
    np.testing.assert_allclose(y_vec, a @ vec, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y_block, a @ block, rtol=1e-12, atol=1e-12)


# ----- DAC and ADC ----------------------------------------------------------------------------
@pytest.mark.parametrize("dac_bits", [1, 2, 4, 8])
@pytest.mark.parametrize("dac_range", [None, 0.8])
def test_dac_only_equals_per_tile_quantised_input_product(device, dac_bits, dac_range):
    rng = np.random.default_rng(100 + dac_bits)
    n_in, n_out, tile_rows = 50, 11, 16
    w = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((12, n_in)) * rng.uniform(0.1, 3.0, size=(12, 1))
    cfg = IDEAL.replace(dac_bits=dac_bits, dac_range=dac_range, tile_rows=tile_rows, tile_cols=4)
    y = run(linear_layer(w, cfg, device), x, device)
    x_q = np_dac(x, tile_rows, dac_bits, dac_range)
    assert np.abs(x_q - x).max() > 1e-3  # the quantisation is visible
    np.testing.assert_allclose(y, x_q @ w.T, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("adc_bits", [1, 3, 6, 10])
def test_adc_only_equals_per_tile_auto_ranged_partial_sums(device, adc_bits):
    rng = np.random.default_rng(200 + adc_bits)
    n_in, n_out, tile_rows, tile_cols = 45, 23, 16, 8
    w = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((10, n_in))
    cfg = IDEAL.replace(
        adc_ranging="per_read", adc_bits=adc_bits, tile_rows=tile_rows, tile_cols=tile_cols
    )
    y = run(linear_layer(w, cfg, device), x, device)
    ref = np_tiled_adc_product(x, w, tile_rows, tile_cols, adc_bits)
    assert np.abs(ref - x @ w.T).max() > 1e-6  # the ADC is visible
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dac_bits", [None, 5])
def test_fixed_adc_range_saturates_above_full_scale(dac_bits):
    rng = np.random.default_rng(300)
    n_in, n_out, tile_rows, tile_cols, adc_bits = 40, 9, 20, 4, 6
    w = rng.standard_normal((n_out, n_in))
    x = rng.uniform(-1, 1, size=(16, n_in))
    adc_range = 1.5  # normalised units: inputs and weights in [-1, 1], summed per tile column
    cfg = IDEAL.replace(
        dac_bits=dac_bits,
        adc_bits=adc_bits,
        adc_range=adc_range,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
    )
    y = run(linear_layer(w, cfg), x)
    ref = np_tiled_adc_product(x, w, tile_rows, tile_cols, adc_bits, adc_range, dac_bits)
    unclipped = np_tiled_adc_product(x, w, tile_rows, tile_cols, 16, None, dac_bits)
    assert np.abs(ref - unclipped).max() > 0.5  # some partial sums are above full scale
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


# ----- read noise -----------------------------------------------------------------------------
@pytest.mark.parametrize("adc_bits", [None, 16], ids=["fast_path", "stack_path_adc16"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_read_noise_output_variance_matches_cell_noise_formula(adc_bits, dtype):
    # float32 with an ADC runs the compiled epilogue and its noise stream (native_rng)
    sigma = 0.02
    cfg = RRAMConfig(
        adc_ranging="per_read",
        material=readonly_material(sigma),
        dac_bits=None,
        adc_bits=adc_bits,
        tile_rows=16,
        tile_cols=4,
        write_verify_tolerance=1e-9,
    )
    rng = np.random.default_rng(400)
    n_in, n_out, reps, calls = 40, 10, 1500, 2
    w = rng.standard_normal((n_out, n_in))
    vectors = rng.standard_normal((2, n_in))
    layer = linear_layer(w, cfg).to(dtype)
    batch = np.repeat(vectors, reps, axis=0)
    samples = np.concatenate([run(layer, batch) for _ in range(calls)]).astype(np.float64)
    samples = samples.reshape(calls, 2, reps, n_out)
    samples = samples.transpose(1, 0, 2, 3).reshape(2, calls * reps, n_out)
    n = calls * reps

    # expected: each tile column sums R noisy cell pairs; var = 2 sigma^2 sum_t ||x_t||^2 cs_t^2
    expected_var = np.zeros((2, n_out))
    for sl in input_tiles(n_in, cfg.tile_rows):
        cs = tile_col_scale(w[:, sl])
        expected_var += 2 * sigma**2 * (vectors[:, sl] ** 2).sum(1, keepdims=True) * cs**2
    mean_ref = vectors @ np_readback(layer, 1e-6, 1e-5).T

    sample_var = samples.var(axis=1, ddof=1)
    cells = sample_var.size
    lo = scipy.stats.chi2.ppf(1e-6 / cells, n - 1) / (n - 1)
    hi = scipy.stats.chi2.ppf(1 - 1e-6 / cells, n - 1) / (n - 1)
    ratio = sample_var / expected_var
    assert np.all((ratio > lo) & (ratio < hi)), (ratio.min(), ratio.max(), lo, hi)
    pooled = ratio.mean()
    assert abs(pooled - 1) < 5 * math.sqrt(2 / ((n - 1) * cells)), pooled
    mean_err = (samples.mean(axis=1) - mean_ref) / np.sqrt(expected_var / n)
    assert np.abs(mean_err).max() < 5.5


def test_read_noise_differs_between_calls_and_is_off_when_disabled():
    cfg = RRAMConfig(material=readonly_material(), dac_bits=None, adc_bits=None, tile_rows=8)
    rng = np.random.default_rng(401)
    w = rng.standard_normal((6, 20))
    x = rng.standard_normal((3, 20))
    noisy = linear_layer(w, cfg)
    assert np.abs(run(noisy, x) - run(noisy, x)).max() > 1e-3
    quiet = linear_layer(w, cfg.replace(read_noise=False))
    np.testing.assert_array_equal(run(quiet, x), run(quiet, x))
    np.testing.assert_allclose(run(quiet, x), x @ np_readback(quiet, 1e-6, 1e-5).T, rtol=1e-12)


# ----- stuck-at faults ------------------------------------------------------------------------
def _binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 5 * math.sqrt(p * (1 - p) / n)


def _np_targets(w: np.ndarray, tile_rows: int, g_min: float, g_max: float):
    """Target G+ and G- (T, R, out) of the documented differential-pair mapping."""
    n_out, n_in = w.shape
    n_tiles = math.ceil(n_in / tile_rows)
    wp = np.zeros((n_out, n_tiles * tile_rows))
    wp[:, :n_in] = w
    tiles = wp.reshape(n_out, n_tiles, tile_rows).transpose(1, 2, 0)
    scale = np.abs(tiles).max(axis=1, keepdims=True)
    norm = tiles / np.where(scale > 0, scale, 1.0)
    g_range = g_max - g_min
    return g_min + g_range * np.maximum(norm, 0), g_min + g_range * np.maximum(-norm, 0)


def test_stuck_cells_fraction_matches_probability_and_read_gmin_gmax():
    p_min, p_max = 0.03, 0.02
    tile_rows = 64
    cfg = IDEAL.replace(
        stuck_at_gmin_prob=p_min, stuck_at_gmax_prob=p_max, tile_rows=tile_rows, tile_cols=32
    )
    rng = np.random.default_rng(500)
    w = rng.standard_normal((150, 200))
    layer = linear_layer(w, cfg)
    layer.program_()
    g = np.stack([layer.g_pos.numpy(), layer.g_neg.numpy()])
    target = np.stack(_np_targets(w, tile_rows, IDEAL_G_MIN, IDEAL_G_MAX))
    assert g.shape == target.shape

    at_min, at_max = g == IDEAL_G_MIN, g == IDEAL_G_MAX
    on_target = np.isclose(g, target, rtol=1e-12, atol=0)
    assert np.all(at_min | at_max | on_target)  # every cell is programmed or stuck

    interior = (target > IDEAL_G_MIN * (1 + 1e-9)) & (target < IDEAL_G_MAX * (1 - 1e-9))
    n_int = int(interior.sum())
    assert _binomial_ok(int((interior & at_min).sum()), n_int, p_min)
    assert _binomial_ok(int((interior & at_max).sum()), n_int, p_max)
    wants_min = target == IDEAL_G_MIN
    assert _binomial_ok(int((wants_min & at_max).sum()), int(wants_min.sum()), p_max)

    x = rng.standard_normal((5, 200))
    np.testing.assert_allclose(
        run(layer, x), x @ np_readback(layer, IDEAL_G_MIN, IDEAL_G_MAX).T, rtol=1e-12, atol=1e-12
    )


def test_stuck_cells_stay_the_same_cells_after_reprogramming():
    tile_rows = 32
    cfg = IDEAL.replace(stuck_at_gmax_prob=0.05, tile_rows=tile_rows, tile_cols=16)
    rng = np.random.default_rng(501)
    w1, w2 = rng.standard_normal((2, 40, 70))
    layer = linear_layer(w1, cfg)
    layer.program_()
    g1 = np.stack([layer.g_pos.numpy(), layer.g_neg.numpy()])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w2))
    run(layer, rng.standard_normal((1, 70)))  # re-programs on the changed weight
    g2 = np.stack([layer.g_pos.numpy(), layer.g_neg.numpy()])
    t1 = np.stack(_np_targets(w1, tile_rows, IDEAL_G_MIN, IDEAL_G_MAX))
    t2 = np.stack(_np_targets(w2, tile_rows, IDEAL_G_MIN, IDEAL_G_MAX))
    stuck1 = (g1 == IDEAL_G_MAX) & (t1 < IDEAL_G_MAX)
    stuck2 = (g2 == IDEAL_G_MAX) & (t2 < IDEAL_G_MAX)
    assert stuck1.sum() > 50
    np.testing.assert_array_equal(stuck1 & (t2 < IDEAL_G_MAX), stuck2 & (t1 < IDEAL_G_MAX))


# ----- drift ----------------------------------------------------------------------------------
@pytest.mark.parametrize("time_s", [0.5, 10.0, 86400.0])
def test_drift_scales_both_cells_by_time_power_law(time_s):
    nu = 0.06
    g_min, g_max = 1e-6, 1e-5
    cfg = RRAMConfig(
        material=drift_material(nu),
        dac_bits=None,
        adc_bits=None,
        drift_time_s=time_s,
        tile_rows=16,
        tile_cols=8,
    )
    rng = np.random.default_rng(600)
    w = rng.standard_normal((12, 30))
    layer = linear_layer(w, cfg)
    layer.program_()
    gp, gn = layer.g_pos.numpy(), layer.g_neg.numpy()
    factor = time_s**-nu if time_s > 1.0 else 1.0
    expected = (gp * factor - gn * factor) / (g_max - g_min)
    np.testing.assert_allclose(layer.w_read.numpy(), expected, rtol=1e-12, atol=1e-15)

    x = rng.standard_normal((4, 30))
    ref = x @ (np_readback(layer, g_min, g_max) * factor).T
    np.testing.assert_allclose(run(layer, x), ref, rtol=1e-12, atol=1e-12)


# ----- IR drop: exact nodal analysis -------------------------------------------------------
def nodal_sense_currents(g: np.ndarray, v_in: np.ndarray, r_wire: float) -> np.ndarray:
    """Exact currents (B, C) into the virtual-ground sense nodes of a resistive crossbar.

    g: cell conductances (R, C) in S; v_in: word-line voltages (B, R). Word line i is driven
    at its column-0 end through one wire segment; neighbouring cells along word lines and
    bit lines are joined by segments of ``r_wire``; each bit line reaches its sense node
    (0 V) one segment past the last row.
    """
    rows, cols = g.shape
    n = rows * cols
    wl = np.arange(n).reshape(rows, cols)
    bl = n + wl
    g_wire = 1.0 / r_wire
    edges: list[tuple[int, int, float]] = []
    grounded: list[tuple[int, float]] = []
    for i in range(rows):
        grounded.append((wl[i, 0], g_wire))  # driver (a source: its voltage goes to the rhs)
        for k in range(cols):
            edges.append((wl[i, k], bl[i, k], g[i, k]))
            if k + 1 < cols:
                edges.append((wl[i, k], wl[i, k + 1], g_wire))
            if i + 1 < rows:
                edges.append((bl[i, k], bl[i + 1, k], g_wire))
    for k in range(cols):
        grounded.append((bl[rows - 1, k], g_wire))
    r_idx, c_idx, vals = [], [], []
    for a, b, ga in edges:
        r_idx += [a, b, a, b]
        c_idx += [a, b, b, a]
        vals += [ga, ga, -ga, -ga]
    for a, ga in grounded:
        r_idx.append(a)
        c_idx.append(a)
        vals.append(ga)
    y = scipy.sparse.csc_matrix((vals, (r_idx, c_idx)), shape=(2 * n, 2 * n))
    rhs = np.zeros((2 * n, v_in.shape[0]))
    rhs[wl[:, 0], :] = v_in.T * g_wire
    v = scipy.sparse.linalg.splu(y).solve(rhs)
    return (v[bl[rows - 1, :], :] * g_wire).T


def np_ir_drop_layer_output(
    w: np.ndarray, x: np.ndarray, r_wire: float, tile_rows: int, tile_cols: int
) -> np.ndarray:
    """Layer output with every physical tile (G+ and G- arrays) solved exactly."""
    g_range = IDEAL_G_MAX - IDEAL_G_MIN
    y = np.zeros((x.shape[0], w.shape[0]))
    for sl in input_tiles(w.shape[1], tile_rows):
        wt = w[:, sl]
        cs = tile_col_scale(wt)
        norm = (wt / cs[:, None]).T  # (rows, out)
        for c0 in range(0, w.shape[0], tile_cols):
            cols = slice(c0, min(c0 + tile_cols, w.shape[0]))
            gp = IDEAL_G_MIN + g_range * np.maximum(norm[:, cols], 0)
            gn = IDEAL_G_MIN + g_range * np.maximum(-norm[:, cols], 0)
            i_diff = nodal_sense_currents(gp, x[:, sl], r_wire) - nodal_sense_currents(
                gn, x[:, sl], r_wire
            )
            y[:, cols] += i_diff / g_range * cs[cols]
    return y


@pytest.mark.parametrize(
    ("n_in", "n_out", "tile_rows", "tile_cols"), [(8, 6, 8, 6), (16, 12, 8, 6)]
)
def test_ir_drop_first_order_model_tracks_exact_nodal_solution(n_in, n_out, tile_rows, tile_cols):
    rng = np.random.default_rng(700 + n_in)
    w = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((6, n_in))
    ideal = x @ w.T
    effects, model_errors = [], []
    for r_wire in (100.0, 50.0):
        cfg = IDEAL.replace(wire_resistance_ohm=r_wire, tile_rows=tile_rows, tile_cols=tile_cols)
        y_model = run(linear_layer(w, cfg), x)
        y_exact = np_ir_drop_layer_output(w, x, r_wire, tile_rows, tile_cols)
        effect = np.linalg.norm(y_exact - ideal)
        model_error = np.linalg.norm(y_model - y_exact)
        assert effect > 1e-3 * np.linalg.norm(ideal)  # the IR drop is visible
        assert model_error < 0.1 * effect, (r_wire, model_error / effect)
        effects.append(effect)
        model_errors.append(model_error)
    assert 1.8 < effects[0] / effects[1] < 2.2  # the effect is first order in r
    assert 3.0 < model_errors[0] / model_errors[1] < 5.0  # the model's error is O(r^2)


def test_ir_drop_warns_outside_first_order_validity():
    rng = np.random.default_rng(701)
    w = rng.standard_normal((6, 8))
    cfg = IDEAL.replace(wire_resistance_ohm=2000.0, tile_rows=8, tile_cols=6)
    with pytest.warns(RuntimeWarning, match="IR drop"):
        linear_layer(w, cfg).program_()


# ----- operation counters ---------------------------------------------------------------------
@pytest.mark.parametrize("correction", ["none", "first_order"])
def test_linear_operation_counters_match_hand_count(correction):
    n_in, n_out, tile_rows, tile_cols = 70, 50, 32, 16  # 3 input tiles, 4 column tiles
    cfg = RRAMConfig(
        material="ideal",
        dac_bits=6,
        adc_bits=8,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
        correction=correction,
    )
    layer = RRAMLinear(n_in, n_out, config=cfg)
    reads = 3 if correction == "first_order" else 1
    with torch.no_grad():
        layer(torch.randn(2, 5, n_in, generator=torch.Generator().manual_seed(800)))
        layer(torch.randn(3, n_in, generator=torch.Generator().manual_seed(801)))
    vectors = 2 * 5 + 3
    stats = layer.rram_stats
    assert stats.matrix_products == reads * vectors
    assert stats.adc_conversions == reads * vectors * 3 * n_out
    assert stats.programming_events == 1
    if correction == "none":
        assert stats.tile_reads == vectors * 3 * 4
        assert stats.dac_conversions == vectors * n_in
        assert stats.input_cells_programmed == 0
    else:
        # A~ x and A~ x~: ordinary reads; A x~: one read of the x~ array per output and
        # input tile, each applying that tile's row of A through the DAC
        assert stats.tile_reads == 2 * vectors * 3 * 4 + vectors * 3 * n_out
        assert stats.dac_conversions == 2 * vectors * n_in + vectors * n_in * n_out
        # x~ written onto two cells per input value (the input tiles padded to 3 x 32)
        assert stats.input_cells_programmed == 2 * vectors * 3 * tile_rows


def test_linear_without_adc_counts_no_adc_conversions():
    layer = RRAMLinear(10, 4, config=IDEAL.replace(tile_rows=4))
    with torch.no_grad():
        layer(torch.randn(7, 10, generator=torch.Generator().manual_seed(802)))
    assert layer.rram_stats.adc_conversions == 0
    assert layer.rram_stats.tile_reads == 7 * 3


@pytest.mark.parametrize("correction", ["none", "first_order"])
def test_conv_operation_counters_match_hand_count(correction):
    # 6 channels, 3x3 kernel, tile_rows 27 -> 3 channels per tile, 2 input tiles;
    # 8 outputs over tile_cols 5 -> 2 column tiles; 7x7 output with padding 1.
    cfg = RRAMConfig(
        material="ideal",
        dac_bits=6,
        adc_bits=8,
        tile_rows=27,
        tile_cols=5,
        correction=correction,
    )
    conv = RRAMConv2d(6, 8, 3, padding=1, config=cfg)
    with torch.no_grad():
        conv(torch.randn(2, 6, 7, 7, generator=torch.Generator().manual_seed(803)))
    reads = 3 if correction == "first_order" else 1
    vectors = 2 * 7 * 7
    stats = conv.rram_stats
    assert stats.matrix_products == reads * vectors
    assert stats.tile_reads == reads * vectors * 2 * 2
    assert stats.dac_conversions == reads * vectors * 6 * 9
    assert stats.adc_conversions == reads * vectors * 2 * 8


def test_conv_dac_counter_counts_real_inputs_when_last_tile_is_partial():
    # regression: the zero channels that pad the last input tile were counted as DAC inputs
    # 5 channels at 3 per tile: the second tile holds 2 real channels (18 of 27 rows)
    cfg = RRAMConfig(material="ideal", dac_bits=6, adc_bits=8, tile_rows=27, tile_cols=5)
    conv = RRAMConv2d(5, 8, 3, padding=1, config=cfg)
    with torch.no_grad():
        conv(torch.randn(2, 5, 7, 7, generator=torch.Generator().manual_seed(804)))
    assert conv.rram_stats.dac_conversions == 2 * 7 * 7 * 5 * 9


BCSSTK02 = Path(__file__).resolve().parents[3] / "shared" / "data" / "bcsstk02.mtx"


# ----- first-order correction -----------------------------------------------------------------
def _dac_codes(v: np.ndarray, bits: int, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Codes of v over its |max| along ``axis`` (1 where all zero) and that range."""
    levels = 2 ** (bits - 1) - 1
    scale = np.abs(v).max(axis=axis, keepdims=True)
    scale = np.where(scale > 0, scale, 1.0)
    return np.round(v / scale * levels), scale


@pytest.mark.parametrize("material", ["taox_hfox", "ag_asi"])
def test_first_order_correction_is_three_device_reads_of_meliso_formula(material):
    # p = A x~ + A~ x - A~ x~ with every product a crossbar read: x~ is x written onto
    # cells (write-and-verify) and read back, A x~ applies A's DAC codes to the x~ array,
    # A~ x and A~ x~ read the programmed weights with DAC codes of x and of x~
    n_in, n_out, tile_rows, tile_cols, dac_bits = 40, 12, 16, 8, 6
    cfg = RRAMConfig(
        material=material,
        dac_bits=dac_bits,
        adc_bits=None,
        read_noise=False,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
        correction="first_order",
        seed=900,
    )
    rng = np.random.default_rng(900)
    a = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((7, n_in))
    layer = linear_layer(a, cfg)
    seen = []
    original = layer._program_inputs
    layer._program_inputs = lambda u: seen.append(original(u)) or seen[-1]
    p = run(layer, x)
    (prog,) = seen
    x_read = prog.x_read.double().numpy()  # (B, T, R): x~ over each tile's DAC range
    levels = 2 ** (dac_bits - 1) - 1
    t, r, _ = layer.w_read.shape
    w_read = layer.w_read.double().numpy()  # (T, R, C) normalised programmed weights
    cs = layer.col_scale.double().numpy()  # (T, C)
    xt = np.pad(x, ((0, 0), (0, t * r - n_in))).reshape(7, t, r)
    at = np.pad(a.T, ((0, t * r - n_in), (0, 0))).reshape(t, r, n_out)
    ref = np.zeros((7, n_out))
    for k in range(t):
        codes_x, s = _dac_codes(xt[:, k], dac_bits, 1)  # (B, R), (B, 1)
        codes_a, _ = _dac_codes(at[k], dac_bits, 0)  # A's column codes over col_scale
        np.testing.assert_allclose(np.abs(at[k]).max(0), cs[k])
        codes_xt = np.clip(np.round(x_read[:, k] * levels), -levels, levels)
        term_a = (x_read[:, k] @ codes_a) * s / levels  # A x~ on the x~ array
        term_x = (codes_x @ w_read[k]) * s / levels  # A~ x
        term_xt = (codes_xt @ w_read[k]) * s / levels  # A~ x~
        ref += cs[k] * (term_a + term_x - term_xt)
    np.testing.assert_allclose(p, ref, rtol=1e-9, atol=1e-9)
    # x~ carries the material's programming error, and the write was counted
    x_norm = xt / np.where(
        np.abs(xt).max(2, keepdims=True) > 0, np.abs(xt).max(2, keepdims=True), 1
    )
    err = np.abs(x_read - x_norm)
    # every cell carries device error, typical cells are verified close to their target
    # (a rare tail cell that write-and-verify cannot bring in misses by up to ~0.7 of the
    # range, so the bound is on the median, not the max)
    assert err.max() > 1e-3 and np.median(err) < 0.1
    assert layer.rram_stats.input_cells_programmed == 2 * 7 * t * r
    assert layer.rram_stats.input_programming_pulses == prog.stats.pulses > 0


def _mvm_errors(material: str, **cfg_changes) -> dict[str, float]:
    a = scipy.io.mmread(BCSSTK02).toarray() if BCSSTK02.is_file() else None
    if a is None:
        rng = np.random.default_rng(901)
        a = rng.standard_normal((66, 66))
    errors: dict[str, list[float]] = {"none": [], "first_order": []}
    for seed in range(3):
        x = np.random.default_rng(seed).standard_normal(a.shape[1])
        for correction in errors:
            cfg = RRAMConfig(material=material, correction=correction, seed=seed, **cfg_changes)
            errors[correction].append(st.rram.mvm(a, x, cfg, compare=True).stats["rel_l2"])
    return {k: float(np.median(v)) for k, v in errors.items()}


@pytest.mark.parametrize(
    ("material", "factor"),
    [("epiram", 10.0), ("ag_asi", 10.0), ("alox_hfo2", 10.0), ("taox_hfox", 3.0)],
)
def test_first_order_correction_cuts_the_error_where_programming_error_dominates(material, factor):
    # 16-bit DAC, no read noise, no ADC: the error is the programming error of A and of
    # x~; what is left is second order, (A - A~)(x - x~). taox_hfox programs less
    # accurately (its verify misses more cells), so its second-order rest is larger.
    errors = _mvm_errors(material, dac_bits=16, adc_bits=None, read_noise=False)
    measured = errors["none"] / errors["first_order"]
    print(f"{material}: {errors['none']:.3e} -> {errors['first_order']:.3e} (x{measured:.1f})")
    assert measured > factor


def test_first_order_correction_hurts_where_read_noise_dominates():
    # the other regime: with read noise far above the programming error the three noisy
    # reads of the correction add noise instead of removing error
    noisy = dataclasses.replace(
        st.rram.get_material("epiram"), name="epiram_noisy_read", read_noise=0.05
    )
    errors = _mvm_errors(noisy, dac_bits=16, adc_bits=None)
    print(f"read noise 5 %: {errors['none']:.3e} -> {errors['first_order']:.3e}")
    assert errors["first_order"] > errors["none"]


# ----- reads in chunks: same product, bounded memory -------------------------------------------
@pytest.mark.parametrize("batch", [1, 9, 37, 64])
def test_dac_adc_path_equals_reference_for_batches_read_in_chunks(batch):
    # 5 input tiles: a batch above 8 rows is read in chunks of batch // 5 (at least 8) rows
    rng = np.random.default_rng(900 + batch)
    n_in, n_out, tile_rows, tile_cols = 75, 19, 16, 8
    w = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((batch, n_in)) * rng.uniform(0.2, 2.0, size=(batch, 1))
    cfg = IDEAL.replace(
        adc_ranging="per_read", dac_bits=6, adc_bits=5, tile_rows=tile_rows, tile_cols=tile_cols
    )
    y = run(linear_layer(w, cfg), x)
    ref = np_tiled_adc_product(x, w, tile_rows, tile_cols, adc_bits=5, dac_bits=6)
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


def _forward_peak_bytes(fn) -> int:
    """Largest amount of memory allocated above the starting level while ``fn()`` runs
    (output included), from the allocation events of the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        fn()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    level = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def test_linear_forward_memory_stays_within_three_digital_forwards_whatever_the_tiles():
    cfg = RRAMConfig(material="taox_hfox", tile_rows=64, tile_cols=64, dac_bits=8, adc_bits=8)
    digital = torch.nn.Linear(512, 256)
    layer = RRAMLinear.from_linear(digital, cfg)  # 8 input tiles: 8 partial sums per output
    x = torch.randn(128, 512, generator=torch.Generator().manual_seed(5))
    digital_peak = _forward_peak_bytes(lambda: digital(x))
    assert digital_peak >= 128 * 256 * 4  # the output
    assert _forward_peak_bytes(lambda: layer(x)) <= 3 * digital_peak


def test_conv_forward_memory_stays_within_three_digital_forwards():
    # images are read in chunks (one image at least): the bound holds when one image's
    # partial sums are small next to the batch's output, as here (3 tiles, 8 images)
    cfg = RRAMConfig(material="taox_hfox", tile_rows=128, tile_cols=64, dac_bits=8, adc_bits=8)
    digital = torch.nn.Conv2d(32, 64, 3, padding=1)
    layer = RRAMConv2d.from_conv(digital, cfg)  # 14 channels per tile: 3 tiles
    x = torch.randn(8, 32, 16, 16, generator=torch.Generator().manual_seed(6))
    digital_peak = _forward_peak_bytes(lambda: digital(x))
    assert digital_peak >= 8 * 64 * 16 * 16 * 4  # the output
    assert _forward_peak_bytes(lambda: layer(x)) <= 3 * digital_peak


@pytest.mark.parametrize("adc_range", [None, 0.4])
@pytest.mark.parametrize("batch", [5, 70])
def test_float32_read_equals_numpy_reference_within_one_adc_step(adc_range, batch):
    # float32 on CPU runs the compiled epilogue (native_rng) when a C compiler is present,
    # the eager path otherwise; both must match the float64 NumPy reference up to float32
    # rounding, which may move a value across an ADC decision boundary (one step).
    rng = np.random.default_rng(950 + batch)
    n_in, n_out, tile_rows, tile_cols, dac_bits, adc_bits = 75, 40, 16, 8, 6, 5
    w = rng.standard_normal((n_out, n_in))
    x = rng.standard_normal((batch, n_in)) * rng.uniform(0.2, 2.0, size=(batch, 1))
    cfg = IDEAL.replace(
        adc_ranging="per_read",
        dac_bits=dac_bits,
        adc_bits=adc_bits,
        adc_range=adc_range,
        tile_rows=tile_rows,
        tile_cols=tile_cols,
    )
    layer = RRAMLinear(n_in, n_out, bias=False, config=cfg)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w))
        y = layer(torch.from_numpy(x).float()).double().numpy()
    ref = np_tiled_adc_product(x, w, tile_rows, tile_cols, adc_bits, adc_range, dac_bits)
    tol = 1e-4 * np.abs(ref).max()
    off = np.abs(y - ref) > tol
    assert off.mean() < 0.02  # rare boundary cases only
    # a boundary case is one ADC step of one tile: at most the largest step of the layer
    step = np.abs(ref).max() / levels_of(adc_bits)
    assert np.abs(y - ref).max() <= 2 * step


@pytest.mark.parametrize("groups", [1, 4])
def test_conv_first_order_counts_input_writes_once(groups):
    # RRAMConv2d's first-order correction counts the pulses and cells of writing x~ exactly
    # as the write itself reports them (no second, bit-sliced estimate on top)
    torch.manual_seed(911)
    ref = torch.nn.Conv2d(4, 8, 3, groups=groups, bias=False).double()
    cfg = RRAMConfig(material="epiram", correction="first_order", read_noise=False, seed=3)
    layer = RRAMConv2d.from_conv(ref, cfg)
    seen = []
    original = layer._program_inputs
    layer._program_inputs = lambda u: seen.append(original(u)) or seen[-1]
    with torch.no_grad():
        layer(torch.randn(2, 4, 6, 6, dtype=torch.float64))
    assert seen, "first-order correction wrote no input onto cells"
    assert layer.rram_stats.input_programming_pulses == sum(p.stats.pulses for p in seen) > 0
    assert layer.rram_stats.input_cells_programmed == sum(p.stats.cells for p in seen) > 0
