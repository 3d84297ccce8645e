"""The compiled depthwise crossbar read against a float64 NumPy reference of the same read
(noise stream included), and RRAMConv2d's depthwise layers on it against the float64
PyTorch path, an independent im2col model and the read-noise formula."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import sedma_torch as st
from sedma_torch.rram import RRAMConfig, RRAMConv2d, native_depthwise, native_rng

needs_kernel = pytest.mark.skipif(
    not native_depthwise.available(), reason="kernel unavailable: depthwise convs use PyTorch"
)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ----- NumPy reference ----------------------------------------------------------------------
def _np_h32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x7FEB352D)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


def np_hash64(i: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The documented hash of 64-bit counters ``i``: h(h(i_lo + lo) ^ hi ^ h(i_hi)) on their
    low and high 32 bits (h(0) = 0: h(h(i + lo) ^ hi) below 2^32)."""
    i_lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    i_hi = (i >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        return _np_h32(_np_h32(i_lo + np.uint32(lo)) ^ np.uint32(hi) ^ _np_h32(i_hi))


def np_stream(start: int, count: int, key: tuple[int, int]) -> np.ndarray:
    """The documented stream in float64: element e takes pair q = 8 (e >> 4) + (e & 7),
    the cosine when e & 8 == 0, else the sine of its Box-Muller pair (64-bit counters 2q
    and 2q + 1)."""
    e = np.arange(start, start + count, dtype=np.int64)
    q = 8 * (e >> 4) + (e & 7)
    i2 = (2 * q).astype(np.uint64)
    a, b = np_hash64(i2, *key), np_hash64(i2 + np.uint64(1), *key)
    u1 = ((a >> np.uint32(8)).astype(np.float64) + 0.5) / 2**24
    u2 = (b >> np.uint32(8)).astype(np.float64) / 2**24
    r = np.sqrt(-2 * np.log(u1))
    return np.where(e & 8 == 0, r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2))


def np_windows(planes: np.ndarray, kernel, stride, dilation) -> np.ndarray:
    """(N, C, H, W) -> (N, C, H', W', kh * kw) windows, taps in (i, j) order."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    _, _, h, w = planes.shape
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    taps = [
        planes[
            :, :, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw
        ]
        for i in range(kh)
        for j in range(kw)
    ]
    return np.stack(taps, axis=-1)


def np_depthwise_read(
    x, s_in, w, col_scale, spec, kernel, stride=(1, 1), dilation=(1, 1), noise_offset=0
):
    """Float64 reference of one read: (output (N, C m, H', W'), one ADC step per output).
    The DAC multiplies in float32 as the kernel does (a code is then exact); the rest is
    float64. The noise of output e (NCHW index) is stream element noise_offset + e."""
    n, c = x.shape[:2]
    m = w.shape[-1]
    mult = (np.float32(spec.dac_levels) / s_in.T).astype(np.float32)[:, :, None, None]
    codes = x * mult  # float32 product, as the kernel's
    if spec.quantise:
        codes = np.clip(np.round(codes), -spec.dac_levels, spec.dac_levels)
    win = np_windows(codes.astype(np.float64), kernel, stride, dilation)  # (N, C, H', W', K)
    oh, ow = win.shape[2:4]
    u = np.einsum("ncyxk,ckj->ncjyx", win, w.astype(np.float64))
    if spec.noise_std > 0:
        sd = spec.noise_std * np.sqrt((win**2).sum(-1))  # (N, C, H', W')
        z = np_stream(noise_offset, n * c * m * oh * ow, spec.key).reshape(n, c, m, oh, ow)
        u = u + sd[:, :, None] * z
    levels, dac_levels = spec.levels, spec.dac_levels
    out, steps = np.empty_like(u), np.empty_like(u)
    for g0 in range(0, m, spec.group):
        v = u[:, :, g0 : g0 + spec.group]
        if spec.fixed_full is None:
            full = np.abs(v).max(axis=2, keepdims=True)
            full[full == 0] = 1.0
        else:
            full = np.full_like(v[:, :, :1], spec.fixed_full)
        q = np.round(v * levels / full)
        if spec.fixed_full is not None:
            q = np.clip(q, -levels, levels)
        cs = col_scale[None, :, g0 : g0 + spec.group, None, None].astype(np.float64)
        unit = full * s_in.T[:, :, None, None, None] / (levels * dac_levels) * cs
        out[:, :, g0 : g0 + spec.group] = q * unit
        steps[:, :, g0 : g0 + spec.group] = np.abs(unit)
    return out.reshape(n, c * m, oh, ow), steps.reshape(n, c * m, oh, ow)


def _case(seed, n=3, c=5, h=13, w=14, m=1, k=9, zero_plane=True):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c, h, w)) * rng.uniform(0.2, 3.0, (n, c, 1, 1))).astype(np.float32)
    if zero_plane:
        x[0, 1] = 0.0  # an all-zero plane: DAC range 1, ADC range 1
    weights = (rng.standard_normal((c, k, m)) * 0.3).astype(np.float32)
    col_scale = rng.uniform(0.5, 2.0, (c, m)).astype(np.float32)
    s_in = native_rng.tile_absmax(torch.from_numpy(x), 1, c).numpy()  # (C, N)
    return x, weights, col_scale, s_in


def _spec(**changes) -> native_rng.ReadSpec:
    base = dict(
        group=1,
        quantise=True,
        noise_std=0.0,
        levels=31,
        dac_levels=15,
        fixed_full=None,
        key=(0, 0),
    )
    return native_rng.ReadSpec(**{**base, **changes})


def _run(x, weights, col_scale, s_in, spec, kernel, stride=(1, 1), dilation=(1, 1), out=None):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if out is None:
        out = torch.full((n, c * weights.shape[-1], oh, ow), float("nan"))
    native_depthwise.depthwise_read_(
        torch.from_numpy(x),
        torch.from_numpy(s_in),
        torch.from_numpy(weights),
        torch.from_numpy(col_scale),
        out,
        spec,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
    )
    return out


# ----- the kernel ---------------------------------------------------------------------------
@needs_kernel
@pytest.mark.parametrize(("start", "count"), [(0, 1), (5, 40), (1000, 333)])
def test_noise_stream_equals_numpy_reimplementation(start, count):
    key = (123456, 7890)
    got = native_depthwise.noise_stream(start, count, key).numpy()
    want = np_stream(start, count, key)
    # float32 polynomials for log, cos and sin: a few ulp of r (at most about 6)
    assert np.median(np.abs(got - want)) < 1e-6
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@needs_kernel
def test_noise_stream_is_standard_normal_and_uncorrelated():
    z = native_depthwise.noise_stream(0, 320_000, (11, 22)).double().numpy()
    other = native_depthwise.noise_stream(0, 320_000, (12, 22)).double().numpy()
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / z.size)
    blocks = z.reshape(-1, 2, 8)  # cosines and sines of the same pairs, 8 apart
    assert abs(np.corrcoef(blocks[:, 0].ravel(), blocks[:, 1].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 0.01
    assert abs(np.corrcoef(z, other)[0, 1]) < 0.01


READ_CASES = [
    dict(m=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), fixed=None, noise=0.0),
    dict(m=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), fixed=None, noise=0.05),
    dict(m=2, kernel=(3, 3), stride=(2, 2), dilation=(1, 1), fixed=None, noise=0.05),
    dict(m=2, kernel=(5, 5), stride=(1, 2), dilation=(2, 1), fixed=8.0, noise=0.05),
    dict(m=3, kernel=(3, 2), stride=(2, 1), dilation=(1, 2), fixed=None, noise=0.05, group=2),
    # rows wider than the kernel's pixel chunk (1024): one output row per chunk
    dict(
        m=1, kernel=(3, 3), stride=(1, 1), dilation=(1, 1), fixed=None, noise=0.05, size=(4, 1030)
    ),
]


@needs_kernel
@pytest.mark.parametrize("case", READ_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_kernel_equals_numpy_reference_within_one_adc_step(case):
    kernel, m = case["kernel"], case["m"]
    h, w = case.get("size", (13, 14))
    x, weights, col_scale, s_in = _case(sum(kernel) + m, h=h, w=w, m=m, k=kernel[0] * kernel[1])
    spec = _spec(
        group=case.get("group", m),
        noise_std=case["noise"],
        fixed_full=case["fixed"],
        key=(4321, 8765),
        levels=31,
        dac_levels=15,
    )
    want, steps = np_depthwise_read(
        x, s_in, weights, col_scale, spec, kernel, case["stride"], case["dilation"]
    )
    got = _run(x, weights, col_scale, s_in, spec, kernel, case["stride"], case["dilation"])
    got = got.double().numpy()
    assert got.shape == want.shape
    err = np.abs(got - want)
    assert np.all(err <= steps + 1e-5 * np.abs(want) + 1e-6)
    assert np.mean(err > 1e-5 * (np.abs(want) + 1)) < 0.02  # decisions rarely move
    if case["fixed"] is not None:  # the fixed range saturates some outputs
        assert np.any(np.abs(want) >= steps * 31 * (1 - 1e-9))


@needs_kernel
def test_kernel_modes_accumulate_and_exact_input_skips_rounding():
    # first-order correction: write one read, add the exact-input read, subtract a third
    x, weights, col_scale, s_in = _case(7, m=2)
    out = None
    for quantise, mode in ((True, 0), (False, 1), (True, -1)):
        spec = _spec(group=2, quantise=quantise, mode=mode, levels=127, dac_levels=63)
        out = _run(x, weights, col_scale, s_in, spec, (3, 3), out=out)
    want, steps = np_depthwise_read(
        x,
        s_in,
        weights,
        col_scale,
        _spec(group=2, quantise=False, levels=127, dac_levels=63),
        (3, 3),
    )
    # the first and third reads cancel up to float rounding
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=float(steps.max()) * 1e-3)
    added = _run(x, weights, col_scale, s_in, _spec(group=2, mode=1), (3, 3), out=out.clone())
    alone = _run(x, weights, col_scale, s_in, _spec(group=2), (3, 3))
    torch.testing.assert_close(added, out + alone, rtol=1e-6, atol=1e-6)


@needs_kernel
def test_kernel_auto_ranges_the_dac_like_tile_absmax():
    x, weights, col_scale, s_in = _case(10, m=2)  # image 0, channel 1 is all zero
    spec = _spec(group=2, noise_std=0.1, key=(3, 4))
    given = _run(x, weights, col_scale, s_in, spec, (3, 3))
    auto = torch.empty_like(given)
    native_depthwise.depthwise_read_(
        torch.from_numpy(x),
        None,
        torch.from_numpy(weights),
        torch.from_numpy(col_scale),
        auto,
        spec,
        kernel_size=(3, 3),
    )
    assert torch.equal(auto, given)


@needs_kernel
@pytest.mark.parametrize("channels", [5, 11, 16])
@pytest.mark.parametrize("given_ranges", [True, False], ids=["s_in", "auto_range"])
def test_kernel_reads_channels_last_images_as_nchw_ones(channels, given_ranges):
    # NHWC images are read in blocks of 8 channels (a partial last block for 5 and 11)
    x, weights, col_scale, s_in = _case(channels, c=channels, m=2)
    spec = _spec(group=2, noise_std=0.1, key=(7, 8))
    images = torch.from_numpy(x)
    outs = []
    for layout in (torch.contiguous_format, torch.channels_last):
        out = torch.empty(3, 2 * channels, 6, 12)
        native_depthwise.depthwise_read_(
            images.contiguous(memory_format=layout),
            torch.from_numpy(s_in) if given_ranges else None,
            torch.from_numpy(weights),
            torch.from_numpy(col_scale),
            out,
            spec,
            kernel_size=(3, 3),
            stride=(2, 1),
        )
        outs.append(out)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_kernel_result_does_not_depend_on_the_thread_count():
    x, weights, col_scale, s_in = _case(8, n=4, c=16, h=20, w=20, m=2, zero_plane=False)
    spec = _spec(group=2, noise_std=0.1, key=(5, 6))
    threads = torch.get_num_threads()
    try:
        outs = []
        for count in (1, 2):
            torch.set_num_threads(count)
            outs.append(_run(x, weights, col_scale, s_in, spec, (3, 3)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])


@needs_kernel
def test_kernel_rejects_operands_naming_them():
    x, weights, col_scale, s_in = _case(9, m=2)
    args = [torch.from_numpy(v) for v in (x, s_in, weights, col_scale)]
    out = torch.empty(3, 10, 11, 12)

    def call(*operands, spec=None, kernel=(3, 3), stride=(1, 1)):
        native_depthwise.depthwise_read_(
            *operands,
            spec or _spec(group=2),
            kernel_size=kernel,
            stride=stride,
            dilation=(1, 1),
        )

    call(*args, out)  # valid
    with pytest.raises(ValueError, match="x must be"):
        call(args[0].double(), *args[1:], out)
    with pytest.raises(ValueError, match="x must be contiguous"):
        call(args[0].transpose(2, 3), *args[1:], out)
    with pytest.raises(ValueError, match="x must be a 4-d"):
        call(args[0][0], *args[1:], out)
    with pytest.raises(ValueError, match="s_in must have shape"):
        call(args[0], args[1][:, :2], *args[2:], out)
    with pytest.raises(ValueError, match="col_scale must have shape"):
        call(*args[:3], args[3][:, :1], out)
    with pytest.raises(ValueError, match="out must have shape"):
        call(*args, out[:, :, :, :-1])
    with pytest.raises(ValueError, match="out must be contiguous"):
        call(*args, torch.empty(3, 10, 12, 11).transpose(2, 3))
    with pytest.raises(ValueError, match="kernel_size 2x2 does not match"):
        call(*args, out, kernel=(2, 2))
    with pytest.raises(ValueError, match="stride must be"):
        call(*args, out, stride=(0, 1))
    with pytest.raises(ValueError, match=r"spec\.mode"):
        call(*args, out, spec=_spec(group=2, mode=2))
    with pytest.raises(ValueError, match=r"spec\.group"):
        call(*args, out, spec=_spec(group=0))
    with pytest.raises(ValueError, match="smaller than"):
        call(args[0][..., :2, :2].contiguous(), *args[1:], out)


@needs_kernel
@pytest.mark.parametrize("start", [2**31 - 100, 2**32 - 100, 2**33 - 100, 2**62 - 200])
def test_noise_stream_counters_do_not_wrap_near_2_32(start):
    # element e hashes counters about e: 2^32 and 2^33 are crossed inside these ranges
    key = (123456, 7890)
    got = native_depthwise.noise_stream(start, 200, key).numpy()
    want = np_stream(start, 200, key)
    assert np.median(np.abs(got - want)) < 1e-6
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    for shift in (2**31, 2**32):  # other draws, not the same ones again
        if start + shift + 200 <= native_depthwise.MAX_OUTPUTS:
            later = native_depthwise.noise_stream(start + shift, 200, key).numpy()
            assert np.mean(np.abs(later - got) < 1e-6) < 0.02


def test_64_bit_counters_hash_as_32_bit_ones_below_2_32_only():
    # seeded results stay: below 2^32 the hash is h(h(i + lo) ^ hi), as with 32-bit counters
    i = np.arange(2**32 - 1000, 2**32 + 1000, dtype=np.uint64)
    with np.errstate(over="ignore"):
        old = _np_h32(_np_h32(i.astype(np.uint32) + np.uint32(5)) ^ np.uint32(6))
    new = np_hash64(i, 5, 6)
    below = i < 2**32
    np.testing.assert_array_equal(new[below], old[below])
    assert np.all(new[~below] != old[~below])  # where 32-bit counters wrapped onto 0, 1, ...
    assert len(np.unique(new)) == new.size


@needs_kernel
@pytest.mark.parametrize("offset", [2**32 - 1000, 2**40 + 3])
def test_kernel_noise_offset_follows_the_stream_past_2_32(offset):
    x, weights, col_scale, s_in = _case(12, m=2)
    spec = _spec(group=2, noise_std=0.2, key=(99, 98), fixed_full=64.0, levels=4095)
    out = torch.empty(3, 10, 11, 12)
    native_depthwise.depthwise_read_(
        *(torch.from_numpy(v) for v in (x, s_in, weights, col_scale)),
        out,
        spec,
        kernel_size=(3, 3),
        noise_offset=offset,
    )
    want, steps = np_depthwise_read(x, s_in, weights, col_scale, spec, (3, 3), noise_offset=offset)
    err = np.abs(out.double().numpy() - want)
    assert np.all(err <= steps + 1e-5 * np.abs(want) + 1e-6)
    again = torch.empty_like(out)
    native_depthwise.depthwise_read_(
        *(torch.from_numpy(v) for v in (x, s_in, weights, col_scale)),
        again,
        spec,
        kernel_size=(3, 3),
        noise_offset=offset + 2**32,
    )
    assert np.mean(np.abs(again.numpy() - out.numpy()) <= steps) < 0.2  # other noise


def _dw_operands(**case):
    x, weights, col_scale, s_in = _case(9, **{"m": 2, **case})
    return dict(
        x=torch.from_numpy(x),
        s_in=torch.from_numpy(s_in),
        weights=torch.from_numpy(weights),
        col_scale=torch.from_numpy(col_scale),
    )


def _dw(ops, out, spec=None, **geometry):
    native_depthwise.depthwise_read_(
        *ops.values(), out, spec or _spec(group=2, noise_std=0.1, key=(1, 2)), **geometry
    )


@needs_kernel
@pytest.mark.parametrize(
    ("argument", "geometry"),
    [
        ("dilation", dict(dilation=(-10000000, 1))),
        ("dilation", dict(dilation=-2)),
        ("dilation", dict(dilation=(0, 1))),
        ("dilation", dict(dilation=(1, 2**70))),
        ("dilation", dict(dilation=(1.0, 1))),
        ("stride", dict(stride=(0, 1))),
        ("stride", dict(stride=-1)),
        ("stride", dict(stride=(1, 2**64))),
        ("stride", dict(stride=(True, 1))),
        ("kernel_size", dict(kernel_size=(3, 0))),
        ("kernel_size", dict(kernel_size=(-3, -3))),
        ("kernel_size", dict(kernel_size=(3, 3, 1))),
        ("smaller", dict(dilation=(2**40, 1))),
        ("noise_offset", dict(noise_offset=-1)),
        ("noise_offset", dict(noise_offset=2**62)),
        ("noise_offset", dict(noise_offset=0.5)),
    ],
)
def test_kernel_rejects_bad_geometry_naming_it(argument, geometry):
    out = torch.full((3, 10, 11, 12), float("nan"))
    with pytest.raises(ValueError, match=argument):
        _dw(_dw_operands(), out, **{"kernel_size": (3, 3), **geometry})
    assert torch.isnan(out).all()


@needs_kernel
def test_kernel_rejects_a_negative_dilation_with_the_out_it_implies():
    # dilation -2 on 9 x 9 images: 13 x 13 outputs, read from outside the image
    x = torch.randn(2, 3, 9, 9)
    out = torch.full((2, 3, 13, 13), float("nan"))
    with pytest.raises(ValueError, match="dilation"):
        native_depthwise.depthwise_read_(
            x,
            None,
            torch.randn(3, 9, 1),
            torch.ones(3, 1),
            out,
            _spec(noise_std=0.1, key=(1, 2)),
            kernel_size=(3, 3),
            dilation=(-2, -2),
        )
    assert torch.isnan(out).all()


def _respec(**changes):
    return _spec(**{**dict(group=2, noise_std=0.1, key=(1, 2)), **changes})


@needs_kernel
@pytest.mark.parametrize(
    ("argument", "change"),
    [
        ("x", lambda o: o.update(x=o["x"].to("meta"))),
        ("x", lambda o: o.update(x=o["x"][:, :, ::2])),
        ("weights", lambda o: o.update(weights=o["weights"].double())),
        (
            "weights",
            lambda o: o.update(weights=o["weights"].transpose(0, 1).contiguous().transpose(0, 1)),
        ),
        ("weights", lambda o: o.update(weights=o["weights"][:4])),
        ("s_in", lambda o: o.update(s_in=o["s_in"].double())),
        ("s_in", lambda o: o.update(s_in=o["s_in"].t().contiguous().t())),
        ("col_scale", lambda o: o.update(col_scale=o["col_scale"].t().contiguous().t())),
        ("col_scale", lambda o: o.update(col_scale=o["col_scale"].to("meta"))),
        ("spec.levels", lambda o: o.update(spec=_respec(levels=0.5))),
        ("spec.noise_std", lambda o: o.update(spec=_respec(noise_std=float("nan")))),
        ("spec.key", lambda o: o.update(spec=_respec(key=None))),
        ("spec.group", lambda o: o.update(spec=_respec(group=2.0))),
        ("spec", lambda o: o.update(spec="spec")),
    ],
)
def test_kernel_rejects_bad_operands_naming_them(argument, change):
    ops = _dw_operands()
    change(ops)
    spec = ops.pop("spec", None)
    out = torch.full((3, 10, 11, 12), float("nan"))
    with pytest.raises(ValueError, match=rf"(^|\W){argument}\b"):
        native_depthwise.depthwise_read_(*ops.values(), out, spec or _respec(), kernel_size=(3, 3))
    assert torch.isnan(out).all()


@needs_kernel
def test_kernel_rejects_an_out_sharing_memory_with_its_input():
    ops = _dw_operands(m=1, h=5, w=5)
    out = ops["x"][:, :, 1:4, 1:4]  # right shape, not contiguous
    with pytest.raises(ValueError, match="out must be contiguous"):
        _dw(ops, out, spec=_respec(group=1), kernel_size=(3, 3))
    alias = ops["x"].view(-1)[: 3 * 5 * 9].view(3, 5, 3, 3)
    with pytest.raises(ValueError, match="out must not share memory with x"):
        _dw(ops, alias, spec=_respec(group=1), kernel_size=(3, 3))


@needs_kernel
def test_kernel_reads_huge_strides_and_single_tap_dilations_as_the_image_size():
    # a stride past the image is one output row / column, a dilation of one tap unused:
    # the same read as with their smallest equivalents (and nothing of their size allocated)
    ops = _dw_operands(k=3)
    small = torch.empty(3, 10, 1, 14)
    _dw(ops, small, kernel_size=(3, 1), stride=(13, 1), dilation=(6, 1))
    huge = torch.empty(3, 10, 1, 14)
    _dw(ops, huge, kernel_size=(3, 1), stride=(2**62, 1), dilation=(6, 2**62))
    assert torch.equal(small, huge)
    cl = torch.empty(3, 10, 1, 14)
    _dw(
        {**ops, "x": ops["x"].contiguous(memory_format=torch.channels_last)},
        cl,
        kernel_size=(3, 1),
        stride=(2**40, 1),
        dilation=(6, 1),
    )
    assert torch.equal(small, cl)
    # a group wider than the m columns is one group of all m
    wide = torch.empty(3, 10, 1, 14)
    _dw(ops, wide, spec=_respec(group=2**62), kernel_size=(3, 1), stride=(13, 1), dilation=(6, 1))
    assert torch.equal(small, wide)


@needs_kernel
def test_kernel_returns_at_once_for_an_empty_batch_or_no_columns():
    ops = _dw_operands()
    empty = {**ops, "x": ops["x"][:0], "s_in": ops["s_in"][:, :0].contiguous()}
    _dw(empty, torch.empty(0, 10, 11, 12), kernel_size=(3, 3))
    _dw({**empty, "s_in": None}, torch.empty(0, 10, 11, 12), kernel_size=(3, 3))
    no_cols = {**ops, "weights": ops["weights"][..., :0], "col_scale": ops["col_scale"][:, :0]}
    _dw(no_cols, torch.empty(3, 0, 11, 12), kernel_size=(3, 3))
    assert native_depthwise.noise_stream(5, 0, (1, 2)).shape == (0,)


@needs_kernel
@pytest.mark.parametrize(
    ("argument", "args"),
    [
        ("start", (-1, 10)),
        ("count", (0, -1)),
        ("count", (2**62 - 5, 10)),
        ("start", (2**63, 1)),
        ("key", (0, 10, (1, 2.0))),
        ("key", (0, 10, 5)),
    ],
)
def test_noise_stream_rejects_bad_ranges_naming_them(argument, args):
    start, count, *key = args
    with pytest.raises(ValueError, match=argument):
        native_depthwise.noise_stream(start, count, key[0] if key else (1, 2))


# ----- RRAMConv2d -----------------------------------------------------------------------------
IDEAL = RRAMConfig(material="ideal", dac_bits=None, adc_bits=None)


@pytest.fixture
def count_native_reads(monkeypatch):
    """Counts the calls of the compiled depthwise read (it still runs)."""
    calls = []
    real = native_depthwise.depthwise_read_

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native_depthwise, "depthwise_read_", counted)
    return calls


LAYER_CASES = [
    dict(channels=6, m=1, kernel_size=3, padding=1),
    dict(channels=4, m=2, kernel_size=3, stride=2, padding=1),
    dict(channels=5, m=2, kernel_size=(3, 2), stride=(1, 2), dilation=(2, 1), padding=(2, 0)),
    dict(channels=3, m=3, kernel_size=5, padding="same"),
]


@needs_kernel
@pytest.mark.parametrize("case", LAYER_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_float32_depthwise_layer_equals_im2col_model_and_float64_path(case, count_native_reads):
    args = dict(case)
    channels, m = args.pop("channels"), args.pop("m")
    bits, tile_cols = 6, 2
    cfg = IDEAL.replace(
        adc_ranging="per_read", adc_bits=bits, dac_bits=8, tile_rows=25, tile_cols=tile_cols
    )
    torch.manual_seed(80 + m)
    ref = nn.Conv2d(channels, channels * m, groups=channels, dtype=torch.float64, **args)
    layer64 = RRAMConv2d.from_conv(ref, cfg)
    layer32 = copy.deepcopy(layer64).float()
    x = torch.randn(3, channels, 10, 11, dtype=torch.float64, generator=seeded(81))
    with torch.no_grad():
        want64 = layer64(x).numpy()
        got = layer32(x.float()).double().numpy()
        # channels-last images (the compiled 1x1 reads' output) give the same result
        x_cl = x.float().contiguous(memory_format=torch.channels_last)
        assert torch.equal(layer32(x_cl), layer32(x.float()))
        digital = ref(x).numpy()
    assert len(count_native_reads) == 3  # the float32 calls ran the compiled read

    # independent model: DAC per image and channel, each channel's m kernels as crossbar
    # columns scaled by their largest |weight|, ADC over groups of tile_cols columns
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), *_pads(ref, x.shape[-2:])))
    dac_levels, levels = 2**7 - 1, 2 ** (bits - 1) - 1
    s_in = np.abs(xp).max(axis=(2, 3), keepdims=True)
    codes = np.round(xp * dac_levels / s_in)
    win = np_windows(codes, ref.kernel_size, ref.stride, ref.dilation)  # (N, C, H', W', K)
    w = ref.weight.detach().numpy().reshape(channels, m, -1)  # (C, m, K)
    scale = np.abs(w).max(axis=2)  # (C, m)
    u = np.einsum("ncyxk,cjk->ncjyx", win, w / scale[..., None])
    group = tile_cols if m > tile_cols else m
    expected = np.empty_like(u)
    for g0 in range(0, m, group):
        v = u[:, :, g0 : g0 + group]
        step = np.abs(v).max(axis=2, keepdims=True) / levels
        expected[:, :, g0 : g0 + group] = np.round(v / step) * step
    expected = expected * scale[None, :, :, None, None] * s_in[:, :, None] / dac_levels
    expected = expected.reshape(want64.shape) + ref.bias.detach().numpy()[:, None, None]

    top = np.abs(expected).max()
    assert np.abs(expected - digital).max() > 1e-3 * top  # the converters are visible
    np.testing.assert_allclose(want64, expected, rtol=1e-9, atol=1e-9 * top)
    # float32 rounding may move a value across an ADC decision: one step at most
    adc_step = np.abs(u).max() / levels * scale.max() * s_in.max() / dac_levels
    assert np.abs(got - expected).max() <= adc_step * 1.001
    assert np.mean(np.abs(got - expected) > 1e-4 * top) < 0.02


def _pads(conv: nn.Conv2d, size) -> list[tuple[int, int]]:
    """The spatial zero padding of ``conv`` as NumPy pad widths."""
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in conv.padding]


@needs_kernel
def test_depthwise_read_noise_variance_matches_patch_norm_formula(count_native_reads):
    sigma, m = 0.03, 2
    st.rram.register_material(
        st.rram.Material(
            name="depthwise_noise_test",
            g_max=1e-5,
            g_min=1e-6,
            levels_ltp=None,
            levels_ltd=None,
            read_noise=sigma,
        ),
        overwrite=True,
    )
    cfg = RRAMConfig(
        adc_ranging="per_read",
        material="depthwise_noise_test",
        dac_bits=None,
        adc_bits=16,
        tile_rows=9,
        tile_cols=4,
        write_verify_tolerance=1e-9,
    )
    torch.manual_seed(90)
    layer = RRAMConv2d(3, 3 * m, 3, groups=3, bias=False, config=cfg)
    image = torch.randn(1, 3, 3, 3, generator=seeded(91))
    reps = 3000
    with torch.no_grad():
        samples = layer(image.expand(reps, -1, -1, -1)).double().numpy()[:, :, 0, 0]
    assert len(count_native_reads) == 1
    w = layer.weight.detach().double().numpy().reshape(3, m, 9)
    xv = image.double().numpy().reshape(3, 9)
    scale = np.abs(w).max(axis=2)  # column scale of each channel's tile, (3, m)
    expected_var = (2 * sigma**2 * (xv**2).sum(1)[:, None] * scale**2).ravel()
    ratio = samples.var(axis=0, ddof=1) / expected_var
    assert np.all(np.abs(ratio - 1) < 5 * math.sqrt(2 / (reps - 1))), ratio
    exact = np.einsum("cjk,ck->cj", w, xv).ravel()
    assert np.all(np.abs(samples.mean(0) - exact) < 5.5 * np.sqrt(expected_var / reps))
    # the two columns of one channel read the same window with independent noise
    assert abs(np.corrcoef(samples[:, 0], samples[:, 1])[0, 1]) < 5 / math.sqrt(reps)


@needs_kernel
@pytest.mark.parametrize("dac_bits", [None, 6])
def test_float32_depthwise_first_order_compiles_two_reads_and_equals_float64(
    dac_bits, count_native_reads
):
    cfg = IDEAL.replace(
        adc_bits=6, dac_bits=dac_bits, correction="first_order", tile_rows=20, tile_cols=4
    )
    torch.manual_seed(100 + (dac_bits or 0))
    ref = nn.Conv2d(6, 12, 3, padding=1, groups=6, dtype=torch.float64)
    layer64 = RRAMConv2d.from_conv(ref, cfg)
    layer32 = copy.deepcopy(layer64).float()
    x = torch.randn(3, 6, 7, 8, dtype=torch.float64, generator=seeded(101))
    with torch.no_grad():
        want = layer64(x).numpy()
        got = layer32(x.float()).double().numpy()
    # first-order correction writes x~ onto cells in PyTorch (A x~); the two reads of the
    # programmed matrix (A~ x, A~ x~) are compiled (at ideal, x~ = x, so float32 and
    # float64 agree up to rounding)
    assert len(count_native_reads) == 2
    scale = np.abs(want).max()
    off = np.abs(got - want) > 1e-4 * scale
    assert off.mean() < 0.03
    assert np.abs(got - want).max() <= 3 * 2 * scale / (2**5 - 1)  # 3 reads, 2 steps at most


@needs_kernel
def test_float32_depthwise_fixed_converter_ranges_equal_float64_path(count_native_reads):
    # fixed DAC range (clipping) and fixed ADC range (saturating), multiplier 3 on
    # ADC groups of 2 columns
    cfg = IDEAL.replace(
        adc_bits=7, dac_bits=6, dac_range=1.5, adc_range=0.4, tile_rows=9, tile_cols=2
    )
    torch.manual_seed(110)
    ref = nn.Conv2d(4, 12, 3, padding=1, groups=4, dtype=torch.float64)
    layer64 = RRAMConv2d.from_conv(ref, cfg)
    layer32 = copy.deepcopy(layer64).float()
    x = torch.randn(2, 4, 8, 9, dtype=torch.float64, generator=seeded(111))
    with torch.no_grad():
        want = layer64(x).numpy()
        got = layer32(x.float()).double().numpy()
    assert len(count_native_reads) == 1
    assert np.abs(x.numpy()).max() > 1.5  # the DAC clips
    step = 0.4 * 1.5 * np.abs(layer64.col_scale.numpy()).max() / (2**6 - 1)
    assert np.mean(np.abs(want) >= 63 * step * 0.999) > 0.01  # some outputs saturate
    assert np.abs(got - want).max() <= step * 1.001
    assert np.mean(np.abs(got - want) > 1e-4 * step) < 0.02


def test_depthwise_layer_falls_back_to_pytorch_with_native_kernels_off(tmp_path):
    code = """
import copy, torch
from torch import nn
from sedma_torch.rram import RRAMConfig, RRAMConv2d, native_depthwise
assert not native_depthwise.available()
torch.manual_seed(0)
cfg = RRAMConfig(material="ideal", dac_bits=8, adc_bits=10, tile_rows=9, tile_cols=4)
layer64 = RRAMConv2d.from_conv(nn.Conv2d(4, 8, 3, padding=1, groups=4).double(), cfg)
layer32 = copy.deepcopy(layer64).float()
x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
with torch.no_grad():
    want, got = layer64(x), layer32(x.float()).double()
assert got.is_contiguous(memory_format=torch.channels_last)  # the PyTorch path's layout
assert (got - want).abs().max() <= 2 * want.abs().max() / 511, (got - want).abs().max()
"""
    env = {**os.environ, "SEDMA_NATIVE_RNG": "0", "SEDMA_CACHE_DIR": str(tmp_path)}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
