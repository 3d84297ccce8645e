"""Calibrated ADC ranges (``adc_ranging="calibrated"``, the default).

A converter cannot know a read's largest output before it converts it, so by default
each physical tile's ADC full scale is set once per programming -- from the noise-free
partial sums of the first batch the layer reads (or of ``calibrate_adc_``'s calibration
inputs) -- and frozen: a later, larger output saturates at the last code. Every read
path (PyTorch float64, the compiled float32 fused and depthwise reads) is checked here
against a NumPy model of the tiles built from the layer's weights alone."""

from __future__ import annotations

import copy
import io
import math

import numpy as np
import pytest
import torch
from torch import nn

import sedma_torch as st
from sedma_torch.rram import RRAMConfig, RRAMConv2d, RRAMLinear

IDEAL = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def levels(bits: int | None) -> int:
    return 1 if bits is None else max(2 ** (bits - 1) - 1, 1)


# ----- NumPy model of a tiled read ---------------------------------------------------------
def np_tile_products(x: np.ndarray, w: np.ndarray, tile_rows: int, dac_bits: int | None):
    """Rows x (B, n) through the DACs and the tiles of w (out, n) as ``IDEAL`` programs
    them (each tile column normalised by its |max|): (partial sums (T, B, out) in DAC code
    units, DAC scale (T, B, 1), column scale (T, 1, out))."""
    ld = levels(dac_bits)
    us, ss, cs = [], [], []
    for r0 in range(0, x.shape[1], tile_rows):
        xt, wt = x[:, r0 : r0 + tile_rows], w[:, r0 : r0 + tile_rows]
        scale = np.abs(wt).max(axis=1)
        scale = np.where(scale > 0, scale, 1.0)
        if dac_bits is None:
            s, codes = np.ones((x.shape[0], 1)), xt
        else:
            s = np.abs(xt).max(axis=1, keepdims=True)
            s = np.where(s > 0, s, 1.0)
            codes = np.clip(np.round(xt / s * ld), -ld, ld)
        us.append(codes @ (wt / scale[:, None]).T)
        ss.append(s)
        cs.append(scale[None, :])
    return np.stack(us), np.stack(ss), np.stack(cs)


def np_calibrate(u: np.ndarray, tile_cols: int) -> np.ndarray:
    """(T, G) full scales: the largest |partial sum| of each tile and column group."""
    groups = range(0, u.shape[-1], tile_cols)
    full = np.stack([np.abs(u[..., c0 : c0 + tile_cols]).max(axis=(1, 2)) for c0 in groups], 1)
    return np.where(full > 0, full, 1.0)


def np_adc(u: np.ndarray, full: np.ndarray | None, tile_cols: int, bits: int) -> np.ndarray:
    """ADC codes times the step: saturating at calibrated ``full`` (T, G), or per read
    (each row's largest |u| of the group) when ``full`` is None."""
    la = levels(bits)
    out = np.empty_like(u)
    for g, c0 in enumerate(range(0, u.shape[-1], tile_cols)):
        grp = u[..., c0 : c0 + tile_cols]
        if full is None:
            f = np.abs(grp).max(axis=-1, keepdims=True)
            f = np.where(f > 0, f, 1.0)
            out[..., c0 : c0 + tile_cols] = np.round(grp / f * la) * f / la
        else:
            f = full[:, g].reshape(-1, *([1] * (u.ndim - 1)))
            out[..., c0 : c0 + tile_cols] = np.clip(np.round(grp / f * la), -la, la) * f / la
    return out


def assert_read_equal(y: np.ndarray, expected: np.ndarray, dtype: torch.dtype, step: float):
    if dtype == torch.float64:
        np.testing.assert_allclose(y, expected, rtol=1e-9, atol=1e-9)
    else:  # float32 rounding may move a value across an ADC decision boundary (one step)
        off = np.abs(y - expected) > 1e-4 * np.abs(expected).max()
        assert off.mean() < 0.02
        assert np.abs(y - expected).max() <= 1.01 * step


# ----- linear ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dac_bits", [None, 6])
def test_calibrated_linear_adc_freezes_ranges_and_saturates_later_larger_outputs(dac_bits, dtype):
    n_in, n_out, tile_rows, tile_cols, bits = 50, 20, 24, 8, 5
    cfg = IDEAL.replace(dac_bits=dac_bits, adc_bits=bits, tile_rows=tile_rows, tile_cols=tile_cols)
    assert cfg.adc_ranging == "calibrated" and cfg.adc_calibrated
    w = torch.randn(n_out, n_in, dtype=torch.float64, generator=seeded(1))
    ref = nn.Linear(n_in, n_out, bias=False, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(w)
    layer = RRAMLinear.from_linear(ref, cfg).to(dtype)
    calib = 0.3 * torch.randn(12, n_in, dtype=torch.float64, generator=seeded(2))
    # later rows: random ones, and rows aligned with weight rows (the largest outputs)
    later = torch.cat(
        [torch.randn(6, n_in, dtype=torch.float64, generator=seeded(3)), 2 * torch.sign(w[:6])]
    )
    with torch.no_grad():
        layer(calib.to(dtype))  # the first batch read calibrates
        y = layer(later.to(dtype)).double().numpy()
    assert layer.rram_stats.adc_calibration_reads == 12

    wn = w.numpy()
    u_cal, _, _ = np_tile_products(calib.numpy(), wn, tile_rows, dac_bits)
    full = np_calibrate(u_cal, tile_cols)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(layer.adc_full.double().numpy(), full, rtol=tol)
    u, s, cs = np_tile_products(later.numpy(), wn, tile_rows, dac_bits)
    deq = s / levels(dac_bits) * cs
    expected = (np_adc(u, full, tile_cols, bits) * deq).sum(0)
    per_read = (np_adc(u, None, tile_cols, bits) * deq).sum(0)
    # the frozen range is visible: outputs beyond it saturate and differ from per-read ranging
    full_col = np.repeat(full, tile_cols, axis=1)[:, None, :n_out]
    assert (np.abs(u) > full_col).mean() > 0.05
    assert np.abs(expected - per_read).max() > 0.1 * np.abs(per_read).max()
    step = (full_col / levels(bits) * deq).sum(0).max()
    assert_read_equal(y, expected, dtype, step)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_read_ranging_is_the_named_idealisation(dtype):
    n_in, n_out, tile_rows, tile_cols, bits = 40, 12, 16, 5, 4
    cfg = IDEAL.replace(
        adc_bits=bits, tile_rows=tile_rows, tile_cols=tile_cols, adc_ranging="per_read"
    )
    assert not cfg.adc_calibrated
    layer = RRAMLinear(n_in, n_out, bias=False, config=cfg, dtype=dtype)
    x = torch.randn(7, n_in, dtype=torch.float64, generator=seeded(5))
    with torch.no_grad():
        y = layer(x.to(dtype)).double().numpy()
    assert layer.adc_full.numel() == 0 and layer.rram_stats.adc_calibration_reads == 0
    u, s, cs = np_tile_products(x.numpy(), layer.weight.detach().double().numpy(), tile_rows, None)
    expected = (np_adc(u, None, tile_cols, bits) * s * cs).sum(0)
    step = np.abs(u).max() / levels(bits) * cs.max() * u.shape[0]
    assert_read_equal(y, expected, dtype, step)


def test_adc_ranging_is_validated_and_a_fixed_range_wins():
    with pytest.raises(ValueError, match="adc_ranging"):
        RRAMConfig(adc_ranging="oracle")
    assert not RRAMConfig(adc_range=4.0).adc_calibrated
    assert not RRAMConfig(adc_bits=None).adc_calibrated
    layer = RRAMLinear(8, 4, config=IDEAL.replace(adc_bits=6, adc_range=4.0))
    with torch.no_grad():
        layer(torch.randn(3, 8))
    assert layer.adc_full.numel() == 0


def test_calibration_is_kept_by_checkpoints_and_redone_after_reprogramming():
    cfg = RRAMConfig(material="taox_hfox", tile_rows=16, tile_cols=4, adc_bits=6, seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 6))
    st.convert_(model, cfg)
    first = torch.randn(8, 20, generator=seeded(7))
    with torch.no_grad():
        model(first)
    ranges = [m.adc_full.clone() for m in model if isinstance(m, RRAMLinear)]
    assert all(r.shape == (2, 3) or r.shape == (1, 2) for r in ranges)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)

    # a fresh model loading the checkpoint keeps the chip's ranges: no recalibration on a
    # different first batch, and the same answer as the original
    torch.manual_seed(1)
    other = st.convert_(nn.Sequential(nn.Linear(20, 10), nn.ReLU(), nn.Linear(10, 6)), cfg)
    buf.seek(0)
    other.load_state_dict(torch.load(buf))
    big = 5 * torch.randn(4, 20, generator=seeded(8))
    with torch.no_grad():
        want = model(big)
        got = other(big)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for m, r in zip([m for m in other if isinstance(m, RRAMLinear)], ranges, strict=True):
        torch.testing.assert_close(m.adc_full, r, rtol=0, atol=0)
        assert m.rram_stats.adc_calibration_reads == 0

    # a weight change re-programs the chip: its ranges are calibrated again, on the next
    # batch read (here through explicit calibration inputs)
    lin = model[0]
    with torch.no_grad():
        lin.weight.mul_(3.0)
    calib = torch.randn(5, 20, generator=seeded(9))
    lin.calibrate_adc_(calib)
    assert int(lin.program_events) == 2 and lin.rram_stats.adc_calibration_reads == 13
    fresh = copy.deepcopy(lin)
    fresh.adc_full = torch.empty(0)
    fresh.calibrate_adc_(calib)
    torch.testing.assert_close(lin.adc_full, fresh.adc_full, rtol=0, atol=0)
    assert not torch.equal(lin.adc_full, ranges[0])


def test_calibrate_adc_rejects_bad_input_naming_the_layer():
    layer = RRAMLinear(6, 3, config=RRAMConfig(tile_rows=4, tile_cols=2))
    with pytest.raises(ValueError, match="RRAMLinear"):
        layer.calibrate_adc_(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"NaN|finite"):
        layer.calibrate_adc_(torch.full((2, 6), float("nan")))
    assert layer.adc_full.numel() == 0


# ----- convolutions ------------------------------------------------------------------------
def np_im2col(xp: np.ndarray, kh: int, kw: int) -> np.ndarray:
    """Padded (B, C, H, W) -> patches (B, Ho, Wo, C, kh, kw), stride 1."""
    b, c, h, w = xp.shape
    ho, wo = h - kh + 1, w - kw + 1
    out = np.empty((b, ho, wo, c, kh, kw))
    for i in range(kh):
        for j in range(kw):
            out[..., i, j] = xp[:, :, i : i + ho, j : j + wo].transpose(0, 2, 3, 1)
    return out


def np_conv_tiles(x: np.ndarray, w: np.ndarray, groups: int, tile_rows: int):
    """Partial sums of each group's input tiles (T, B Ho Wo, out_g), column scales (T, 1,
    out_g), the output channels of each tile (T lists), for 3x3 padding-1 convolutions."""
    out_ch, c_g, kh, kw = w.shape
    out_g = out_ch // groups
    patches = np_im2col(np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), kh, kw)
    b, ho, wo = patches.shape[:3]
    per_tile = max(tile_rows // (kh * kw), 1)
    us, cs, outs = [], [], []
    for g in range(groups):
        oc = slice(g * out_g, (g + 1) * out_g)
        for c0 in range(0, c_g, per_tile):
            local = slice(c0, min(c0 + per_tile, c_g))
            wt = w[oc, local].reshape(out_g, -1)
            scale = np.abs(wt).max(axis=1)
            pt = patches[:, :, :, g * c_g + local.start : g * c_g + local.stop]
            us.append(pt.reshape(b * ho * wo, -1) @ (wt / scale[:, None]).T)
            cs.append(scale[None, :])
            outs.append(oc)
    return np.stack(us), np.stack(cs), outs, (b, ho, wo)


@pytest.mark.parametrize(
    "groups,dtype",
    [(1, torch.float64), (1, torch.float32), (6, torch.float64), (6, torch.float32)],
    ids=["conv_float64", "conv_float32_compiled", "depthwise_float64", "depthwise_compiled"],
)
def test_calibrated_conv_adc_matches_numpy_tiles(groups, dtype):
    in_ch, out_ch, tile_rows, tile_cols, bits = 6, 12, 18, 5, 5
    cfg = IDEAL.replace(adc_bits=bits, tile_rows=tile_rows, tile_cols=tile_cols)
    torch.manual_seed(40 + groups)
    ref = nn.Conv2d(in_ch, out_ch, 3, padding=1, groups=groups, bias=False, dtype=torch.float64)
    layer = RRAMConv2d.from_conv(ref, cfg).to(dtype)
    calib = 0.25 * torch.randn(3, in_ch, 7, 6, dtype=torch.float64, generator=seeded(41))
    later = torch.randn(2, in_ch, 7, 6, dtype=torch.float64, generator=seeded(42))
    with torch.no_grad():
        layer.calibrate_adc_(calib.to(dtype))
        y = layer(later.to(dtype)).double().numpy()
    assert layer.rram_stats.adc_calibration_reads == 3 * 7 * 6

    w = ref.weight.detach().numpy()
    u_cal, _, _, _ = np_conv_tiles(calib.numpy(), w, groups, tile_rows)
    full = np_calibrate(u_cal, tile_cols)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(layer.adc_full.double().numpy(), full, rtol=tol)
    u, cs, outs, (b, ho, wo) = np_conv_tiles(later.numpy(), w, groups, tile_rows)
    q = np_adc(u, full, tile_cols, bits) * cs
    expected = np.zeros((b * ho * wo, out_ch))
    for t, oc in enumerate(outs):
        expected[:, oc] += q[t]
    expected = expected.reshape(b, ho, wo, out_ch).transpose(0, 3, 1, 2)
    full_col = np.stack([np.repeat(f, tile_cols)[: u.shape[-1]] for f in full])[:, None]
    assert (np.abs(u) > full_col).mean() > 0.05  # the frozen ranges saturate
    step = (full_col / levels(bits) * cs).max() * math.ceil(len(outs) / groups)
    assert_read_equal(y, expected, dtype, step)
