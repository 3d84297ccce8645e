"""State-dependent read noise: the per-cell variance models against their formulas, and
the read-noise variance of layer outputs against a closed-form NumPy prediction built
from the stored conductances (independent of the simulator's noise code)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sedma_torch as st
from sedma_torch.rram import materials, native_rng

MODELS = ("independent", "proportional", "shot")


def _cell_variance(g: np.ndarray, material, model: str) -> np.ndarray:
    """NumPy transcription of each model (normalised weight units squared)."""
    r, rng = material.read_noise, material.g_range
    if model == "independent":
        return np.full_like(g, r * r)
    if model == "proportional":
        return (r * g / rng) ** 2
    if model == "shot":
        return r * r * g / rng
    raise AssertionError(model)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", ["epiram", "ag_asi", "alox_hfo2", "taox_hfox"])
def test_cell_variance_models_equal_their_formulas(name, model):
    mat = st.rram.get_material(name)
    g = torch.linspace(mat.g_min, mat.g_max, 7, dtype=torch.float64)
    got = materials.read_noise_variance(g, mat, model).numpy()
    np.testing.assert_allclose(got, _cell_variance(g.numpy(), mat, model), rtol=1e-12)


def test_published_materials_default_to_state_dependent_noise_and_a_zero_is_quiet():
    for name in ("epiram", "ag_asi", "alox_hfo2", "taox_hfox"):
        mat = st.rram.get_material(name)
        assert mat.read_noise_model == "proportional"
        g = torch.tensor([mat.g_min, mat.g_max], dtype=torch.float64)
        var = materials.read_noise_variance(g, mat)
        # a cell at Gmin (storing zero) is (Gmin / Gmax)^2 as noisy as one at Gmax
        assert float(var[0] / var[1]) == pytest.approx((mat.g_min / mat.g_max) ** 2)
        assert float(var[0]) < mat.read_noise**2  # quieter than the independent model


def test_cmo_model_is_the_measured_fit_and_refuses_windows_outside_it():
    mat = st.rram.get_material("alox_hfo2")  # 13.4-59.2 uS: inside the fit's 8-90 uS
    g = torch.tensor([10e-6, 50e-6], dtype=torch.float64)
    t = 10.0
    sigma_us = 0.0277316483 * np.log10([10.0, 50.0]) * math.sqrt(math.log((t + 1e-6) / 2e-6))
    want = (mat.read_noise * sigma_us * 1e-6 / mat.g_range) ** 2
    np.testing.assert_allclose(materials.read_noise_variance(g, mat, "cmo_1f", t).numpy(), want)
    with pytest.raises(ValueError, match=r"cmo_1f.*8-90 uS.*1-10 uS"):
        st.RRAMConfig(material="taox_hfox", read_noise_model="cmo_1f")
    with pytest.raises(ValueError, match="read_noise_model must be None or one of"):
        st.RRAMConfig(read_noise_model="pink")
    with pytest.raises(ValueError, match="read_noise_model must be one of"):
        materials.Material("x", 1e-5, 1e-6, 8, 8, read_noise_model="pink")


def _linear_prediction(layer, x: np.ndarray, model: str) -> np.ndarray:
    """Read-noise variance of each output of one read: sum over tiles of col_scale^2
    sum_j (DAC-quantised input_j)^2 (s(G+_j) + s(G-_j))."""
    mat = layer.rram_config.device
    gp, gn = layer.g_pos.double().numpy(), layer.g_neg.double().numpy()
    cs = layer.col_scale.double().numpy()
    t, r, _ = gp.shape
    xp = np.pad(x, (0, t * r - x.size)).reshape(t, r)
    s_in = np.abs(xp).max(1, keepdims=True)
    levels = 2 ** (layer.rram_config.dac_bits - 1) - 1
    xq = np.round(xp / s_in * levels) * s_in / levels
    cell = _cell_variance(gp, mat, model) + _cell_variance(gn, mat, model)
    return sum(cs[k] ** 2 * (xq[k] ** 2 @ cell[k]) for k in range(t))


# float64 runs the PyTorch reads; float32 with an ADC the compiled fused read (C)
PATHS = [(None, torch.float64), (16, torch.float64), (16, torch.float32)]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize(("adc_bits", "dtype"), PATHS)
def test_linear_output_noise_variance_matches_the_closed_form(model, adc_bits, dtype):
    torch.manual_seed(3)
    cfg = st.RRAMConfig(
        adc_ranging="per_read",
        material="taox_hfox",
        dac_bits=8,
        adc_bits=adc_bits,
        read_noise_model=model,
        tile_rows=16,
        tile_cols=8,
        seed=4,
    )
    digital = torch.nn.Linear(40, 12, bias=False, dtype=dtype)
    with torch.no_grad():
        digital.weight[:4] = 0  # all-zero outputs: cells at Gmin only
        digital.weight[:, :9] = 0
    layer = st.RRAMLinear.from_linear(digital, config=cfg)
    x = torch.randn(1, 40, dtype=dtype)
    if dtype == torch.float32 and native_rng.available():
        assert layer._native_ok(x)  # the compiled read is the one measured
    n = 1500
    with torch.no_grad():
        ys = torch.cat([layer(x) for _ in range(n)]).double()
    emp = ys.var(0).numpy()
    pred = _linear_prediction(layer, x.double().numpy()[0], model)
    # the sample variance of n Gaussian draws has relative spread sqrt(2 / n) = 3.7 %
    ratio = emp / pred
    assert np.all(np.abs(ratio - 1) < 5 * math.sqrt(2 / n)), ratio
    assert abs(ratio.mean() - 1) < 2 * math.sqrt(2 / n / len(ratio)) + 0.01, ratio


def test_state_dependent_noise_is_quieter_on_zeros_than_the_independent_model():
    # the regime the review found: a sparse matrix whose zeros sit at Gmin
    torch.manual_seed(5)
    a = torch.zeros(24, 48, dtype=torch.float64)
    a[torch.rand(24, 48) < 0.05] = 1.0
    x = torch.randn(1, 48, dtype=torch.float64)
    spread = {}
    for model in ("independent", "proportional"):
        cfg = st.RRAMConfig(material="taox_hfox", dac_bits=8, adc_bits=None, read_noise_model=model)
        layer = st.RRAMLinear(48, 24, bias=False, dtype=torch.float64, config=cfg)
        with torch.no_grad():
            layer.weight.copy_(a)
            ys = torch.cat([layer(x) for _ in range(300)])
        spread[model] = float(ys.var(0).mean())
    # taox_hfox: zero cells at Gmin = Gmax / 10 carry 1/100 of the Gmax variance
    assert spread["proportional"] < 0.2 * spread["independent"], spread


def _conv_prediction(layer, x: np.ndarray, model: str) -> np.ndarray:
    """The same closed form for a stride-1 conv without groups: per output pixel, the
    im2col patch of each input tile through its cell variances. (C_out, H', W')."""
    mat = layer.rram_config.device
    gp, gn = layer.g_pos.double().numpy(), layer.g_neg.double().numpy()
    cs = layer.col_scale.double().numpy()
    cell = _cell_variance(gp, mat, model) + _cell_variance(gn, mat, model)  # (T, cpt*k*k, C)
    t, rows, c_out = cell.shape
    kh, kw = layer.kernel_size
    cpt = rows // (kh * kw)
    c_in, h, w = x.shape
    xp = np.pad(x, ((0, t * cpt - c_in), (0, 0), (0, 0)))
    levels = 2 ** (layer.rram_config.dac_bits - 1) - 1
    out = np.zeros((c_out, h - kh + 1, w - kw + 1))
    for k in range(t):
        tile = xp[k * cpt : (k + 1) * cpt]
        s_in = np.abs(tile).max()
        xq = np.round(tile / s_in * levels) * s_in / levels
        for i in range(out.shape[1]):
            for j in range(out.shape[2]):
                patch = xq[:, i : i + kh, j : j + kw].reshape(-1)  # (channel, i, j) order
                out[:, i, j] += cs[k] ** 2 * (patch**2 @ cell[k])
    return out


@pytest.mark.parametrize("model", ["proportional", "shot"])
@pytest.mark.parametrize(("adc_bits", "dtype"), PATHS)
def test_conv_output_noise_variance_matches_the_closed_form(model, adc_bits, dtype):
    torch.manual_seed(6)
    cfg = st.RRAMConfig(
        adc_ranging="per_read",
        material="alox_hfo2",
        dac_bits=8,
        adc_bits=adc_bits,
        read_noise_model=model,
        tile_rows=18,  # two input channels of 3x3 per tile: 3 tiles for 5 channels
        tile_cols=4,
        seed=7,
    )
    digital = torch.nn.Conv2d(5, 6, 3, bias=False, dtype=dtype)
    layer = st.RRAMConv2d.from_conv(digital, config=cfg)
    x = torch.randn(1, 5, 6, 6, dtype=dtype)
    if dtype == torch.float32 and native_rng.available():
        assert layer._native_ok(x)
    n = 1200
    with torch.no_grad():
        ys = torch.cat([layer(x) for _ in range(n)]).double()
    emp = ys.var(0).numpy()
    pred = _conv_prediction(layer, x.double().numpy()[0], model)
    ratio = emp / pred
    assert np.all(np.abs(ratio - 1) < 5.5 * math.sqrt(2 / n)), ratio
    assert abs(ratio.mean() - 1) < 0.02, ratio.mean()


def test_noise_maps_follow_checkpoints_and_reconfiguration():
    cfg = st.RRAMConfig(material="taox_hfox", read_noise_model="proportional", seed=1)
    a = st.RRAMLinear(20, 6, config=cfg)
    a.program_()
    b = st.RRAMLinear(20, 6, config=cfg)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.w_var, a.w_var, rtol=0, atol=0)  # rebuilt bit-exactly
    a.reconfigure_(cfg.replace(read_noise_model="independent"))
    a.program_()
    assert a.w_var.numel() == 0  # the state-independent model needs no map


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_depthwise_output_noise_variance_matches_the_closed_form(dtype):
    # float32: the compiled depthwise read; float64: the PyTorch path
    torch.manual_seed(8)
    cfg = st.RRAMConfig(
        adc_ranging="per_read",
        material="taox_hfox",
        dac_bits=8,
        adc_bits=16,
        read_noise_model="proportional",
        seed=9,
    )
    digital = torch.nn.Conv2d(4, 8, 3, groups=4, bias=False, dtype=dtype)  # multiplier 2
    layer = st.RRAMConv2d.from_conv(digital, config=cfg)
    x = torch.randn(1, 4, 6, 6, dtype=dtype)
    if dtype == torch.float32 and native_rng.available():
        assert layer._depthwise_native_ok(x)
    n = 1200
    with torch.no_grad():
        ys = torch.cat([layer(x) for _ in range(n)]).double().numpy()
    mat = cfg.device
    cell = _cell_variance(layer.g_pos.double().numpy(), mat, "proportional")
    cell = cell + _cell_variance(layer.g_neg.double().numpy(), mat, "proportional")  # (4, 9, 2)
    cs = layer.col_scale.double().numpy()
    levels = 127
    pred = np.zeros((8, 4, 4))
    xn = x.double().numpy()[0]
    for ch in range(4):
        s_in = np.abs(xn[ch]).max()
        xq = np.round(xn[ch] / s_in * levels) * s_in / levels
        for i in range(4):
            for j in range(4):
                patch = xq[i : i + 3, j : j + 3].reshape(-1)
                pred[2 * ch : 2 * ch + 2, i, j] = cs[ch] ** 2 * (patch**2 @ cell[ch])
    ratio = ys.var(0) / pred
    assert np.all(np.abs(ratio - 1) < 5.5 * math.sqrt(2 / n)), ratio
    assert abs(ratio.mean() - 1) < 0.02, ratio.mean()


def test_first_order_output_noise_is_the_sum_of_its_three_reads_closed_form():
    # deterministic writes (no cycle-to-cycle noise, no device spread), no ADC: the spread
    # of p over repeated forwards is read noise only, three independent draws:
    # Var p = Var(A x~) + Var(A~ x) + Var(A~ x~), each from the cells it reads
    cfg = st.RRAMConfig(
        material="taox_hfox",
        dac_bits=8,
        adc_bits=None,
        tile_rows=16,
        tile_cols=8,
        programming_noise=False,
        device_variation=False,
        correction="first_order",
        seed=11,
    )
    torch.manual_seed(12)
    digital = torch.nn.Linear(30, 10, bias=False, dtype=torch.float64)
    layer = st.RRAMLinear.from_linear(digital, config=cfg)
    x = torch.randn(1, 30, dtype=torch.float64)
    seen = []
    original = layer._program_inputs
    layer._program_inputs = lambda u: seen.append(original(u)) or seen[-1]
    n = 1500
    with torch.no_grad():
        ys = torch.cat([layer(x) for _ in range(n)]).numpy()
    # x~ is the same at every forward (deterministic write)
    assert all(torch.equal(p.x_read, seen[0].x_read) for p in seen)
    mat = cfg.device
    r, gmin = mat.read_noise, mat.g_min / mat.g_range
    x_read = seen[0].x_read.numpy()[0]  # (T, R)
    # proportional noise of the x~ pair: one cell at Gmin + |x~| range, the other at Gmin
    var_x = r**2 * ((gmin + np.maximum(x_read, 0)) ** 2 + (gmin + np.maximum(-x_read, 0)) ** 2)
    gp, gn = layer.g_pos.numpy(), layer.g_neg.numpy()
    var_w = _cell_variance(gp, mat, "proportional") + _cell_variance(gn, mat, "proportional")
    cs = layer.col_scale.numpy()
    t, rows, _ = gp.shape
    levels = 127
    xp = np.pad(x.numpy()[0], (0, t * rows - 30)).reshape(t, rows)
    at = np.pad(digital.weight.detach().numpy().T, ((0, t * rows - 30), (0, 0))).reshape(
        t, rows, 10
    )
    pred = np.zeros(10)
    for k in range(t):
        s = np.abs(xp[k]).max()
        codes_x = np.round(xp[k] / s * levels)
        codes_xt = np.clip(np.round(x_read[k] * levels), -levels, levels)
        codes_a = np.round(at[k] / np.abs(at[k]).max(0) * levels)
        unit = (cs[k] * s / levels) ** 2
        pred += unit * (var_x[k] @ codes_a**2)  # A x~: noise of the x~ cells
        pred += unit * (codes_x**2 @ var_w[k])  # A~ x
        pred += unit * (codes_xt**2 @ var_w[k])  # A~ x~
    ratio = ys.var(0) / pred
    assert np.all(np.abs(ratio - 1) < 5 * math.sqrt(2 / n)), ratio
    assert abs(ratio.mean() - 1) < 0.03, ratio.mean()
