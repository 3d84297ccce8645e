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


def np_stream(n: int, lo: int, hi: int, offset: int = 0) -> np.ndarray:
    """The documented stream in float64 NumPy: Box-Muller on hashed pair counters (pair p
    hashes the counters 2 (p + offset) and 2 (p + offset) + 1)."""
    npairs = (n + 1) // 2
    with np.errstate(over="ignore"):
        i2 = (np.arange(npairs, dtype=np.uint32) + np.uint32(offset)) * np.uint32(2)
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


# ----- the fused crossbar read ------------------------------------------------------------


def np_fused_read(a, s_in, w, col_scale, *, group, levels, dac_levels, fixed, noise_std, key, rows):
    """Float64 NumPy reference of one fused read of code-unit inputs ``a`` (B, T, K):
    per tile t, ADC group and row, the partial sums plus keyed read noise, the ADC, the
    de-quantisation and column scale, summed over t. Also returns, per output, the sum
    over t of one ADC step (float32 rounding may move a sum across one decision)."""
    b, t_tiles, _ = a.shape
    c = w.shape[-1]
    out, steps = np.zeros((b, c)), np.zeros((b, c))
    for t in range(t_tiles):
        u = a[:, t] @ w[t]
        sd = noise_std * np.linalg.norm(a[:, t], axis=1)
        for g0 in range(0, c, group):
            g1 = min(g0 + group, c)
            for r in range(b):
                v = u[r, g0:g1].copy()
                if noise_std > 0:
                    counter = (t * rows + r) * c + g0
                    v += sd[r] * np_stream(g1 - g0, *key, offset=counter)
                full = fixed if fixed is not None else (np.abs(v).max() or 1.0)
                q = np.round(v * levels / full)
                if fixed is not None:
                    q = np.clip(q, -levels, levels)
                unit = full * s_in[t, r] / (levels * dac_levels) * col_scale[t, g0:g1]
                out[r, g0:g1] += q * unit
                steps[r, g0:g1] += np.abs(unit)
    return out, steps


def _read_case(seed, b=13, t=3, k=37, c=50, c_in=100):
    # c_in = 100 inputs on 3 tiles of 37 rows: the last tile is zero padded
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, c_in)) * rng.uniform(0.2, 3.0, (b, 1))).astype(np.float32)
    w = (rng.standard_normal((t, k, c)) * 0.1).astype(np.float32)
    col_scale = rng.uniform(0.5, 2.0, (t, c)).astype(np.float32)
    xt = np.pad(x, ((0, 0), (0, t * k - c_in))).reshape(b, t, k)
    s_in = np.abs(xt).max(-1).T.copy()  # (T, B): one DAC range per row and tile
    return x, xt, w, col_scale, s_in


def _spec(**changes):
    base = dict(
        group=16,
        quantise=True,
        noise_std=0.0,
        levels=7,
        dac_levels=7,
        fixed_full=None,
        key=(0, 0),
    )
    return native_rng.ReadSpec(**{**base, **changes})


def test_tile_absmax_equals_numpy_and_maps_zero_inputs_to_one():
    x = _read_case(3)[0]
    x[4] = 0.0
    got = native_rng.tile_absmax(torch.from_numpy(x), 37, 3).numpy()
    want = np.abs(np.pad(x, ((0, 0), (0, 11))).reshape(13, 3, 37)).max(-1).T
    want[want == 0] = 1.0
    np.testing.assert_array_equal(got, want)
    images = np.random.default_rng(4).standard_normal((2, 7, 3, 5)).astype(np.float32)
    got = native_rng.tile_absmax(torch.from_numpy(images), 3, 3).numpy()
    padded = np.pad(images, ((0, 0), (0, 2), (0, 0), (0, 0))).reshape(2, 3, 3 * 15)
    np.testing.assert_array_equal(got, np.abs(padded).max(-1).T)


@pytest.mark.parametrize(
    ("group", "fixed", "noise_std"), [(50, None, 0.0), (24, None, 0.02), (16, 3000.0, 0.02)]
)
def test_fused_read_equals_numpy_reference_within_one_adc_step(group, fixed, noise_std):
    x, xt, w, col_scale, s_in = _read_case(30 + group)
    dac_levels, levels, key = 31, 15, (12345, 6789)
    codes = np.clip(np.round(xt * (np.float32(dac_levels) / s_in.T[..., None])), -31, 31)
    want, steps = np_fused_read(
        codes.astype(np.float64),
        s_in,
        w,
        col_scale,
        group=group,
        levels=levels,
        dac_levels=dac_levels,
        fixed=fixed,
        noise_std=noise_std,
        key=key,
        rows=x.shape[0],
    )
    packed = native_rng.pack_weights(torch.from_numpy(w), group)
    out = torch.empty(x.shape[0], w.shape[-1])
    spec = _spec(
        group=group,
        noise_std=noise_std,
        levels=levels,
        dac_levels=dac_levels,
        fixed_full=fixed,
        key=key,
    )
    native_rng.fused_read_(
        torch.from_numpy(x),
        torch.from_numpy(s_in),
        packed,
        torch.from_numpy(col_scale),
        out,
        spec,
        tile_rows=37,
    )
    err = np.abs(out.numpy() - want)
    assert np.all(err <= steps + 1e-4 * np.abs(want) + 1e-5)
    assert np.mean(err > 1e-4 * (np.abs(want) + 1)) < 0.02  # decisions rarely move


def test_fused_read_modes_accumulate_and_exact_input_skips_rounding():
    # first-order correction: write one read, add the exact-input read, subtract a third
    x, xt, w, col_scale, s_in = _read_case(77)
    group, levels, dac_levels = 25, 127, 63
    packed = native_rng.pack_weights(torch.from_numpy(w), group)
    base = dict(group=group, levels=levels, dac_levels=dac_levels)
    args = (torch.from_numpy(x), torch.from_numpy(s_in), packed, torch.from_numpy(col_scale))
    out = torch.empty(x.shape[0], w.shape[-1])
    for quantise, mode in ((True, 0), (False, 1), (True, -1)):
        spec = _spec(quantise=quantise, mode=mode, **base)
        native_rng.fused_read_(*args, out, spec, tile_rows=37)
    exact = xt.astype(np.float64) * (dac_levels / s_in.T[..., None])
    want, steps = np_fused_read(
        exact,
        s_in,
        w,
        col_scale,
        group=group,
        levels=levels,
        dac_levels=dac_levels,
        fixed=None,
        noise_std=0.0,
        key=(0, 0),
        rows=x.shape[0],
    )
    # the first and third reads cancel up to float rounding
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-4, atol=float(steps.max()) * 1e-3)


@pytest.mark.parametrize(
    ("kernel", "stride", "dilation", "width"),
    [((3, 3), (1, 1), (1, 1), 14), ((3, 3), (1, 1), (1, 1), 5), ((3, 2), (2, 1), (1, 2), 8)],
)
def test_fused_conv_read_equals_the_dense_read_of_explicit_patches(kernel, stride, dilation, width):
    # wide rows take the kernel's six-neighbour fast path, narrow ones and strides the
    # general gather; both must give the dense read of the same patches exactly
    rng = np.random.default_rng(sum(kernel) + stride[0] + width)
    n, h, c_in, cpt, t, c = 2, 9, 13, 5, 3, 20
    kh, kw = kernel
    images = rng.standard_normal((n, c_in, h, width)).astype(np.float32)
    w = (rng.standard_normal((t, cpt * kh * kw, c)) * 0.1).astype(np.float32)
    col_scale = rng.uniform(0.5, 2.0, (t, c)).astype(np.float32)
    s_in = native_rng.tile_absmax(torch.from_numpy(images), cpt, t)  # (T, N)
    oh = (h - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (width - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    # explicit patches: row (n, oh, ow), K ordered (tile, channel, i, j), channels padded
    padded = np.pad(images, ((0, 0), (0, t * cpt - c_in), (0, 0), (0, 0)))
    patches = np.empty((n, oh, ow, t * cpt, kh, kw), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            y0, x0 = i * dilation[0], j * dilation[1]
            win = padded[
                :, :, y0 : y0 + stride[0] * oh : stride[0], x0 : x0 + stride[1] * ow : stride[1]
            ]
            patches[..., i, j] = win.transpose(0, 2, 3, 1)
    dense = np.ascontiguousarray(patches.reshape(n * oh * ow, t * cpt * kh * kw))
    s_rows = np.repeat(s_in.numpy(), oh * ow, axis=1)  # (T, rows): each image's range
    packed = native_rng.pack_weights(torch.from_numpy(w), 16)
    spec = _spec(levels=31, dac_levels=15, noise_std=0.01, key=(4, 5))
    want = torch.empty(n * oh * ow, c)
    native_rng.fused_read_(
        torch.from_numpy(dense),
        torch.from_numpy(s_rows),
        packed,
        torch.from_numpy(col_scale),
        want,
        spec,
        tile_rows=cpt * kh * kw,
    )
    got = torch.empty(n * oh * ow, c)
    native_rng.fused_conv_read_(
        torch.from_numpy(images),
        s_in,
        packed,
        torch.from_numpy(col_scale),
        got,
        spec,
        cpt=cpt,
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
    )
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same sums in the same order


def test_fused_read_rejects_operands_it_cannot_use():
    x, _, w, col_scale, s_in = _read_case(5)
    packed = native_rng.pack_weights(torch.from_numpy(w), 16)
    spec = _spec()
    args = [torch.from_numpy(x), torch.from_numpy(s_in), packed, torch.from_numpy(col_scale)]
    out = torch.empty(x.shape[0], w.shape[-1])
    with pytest.raises(ValueError, match="out must be"):
        native_rng.fused_read_(*args, out[:, :-1], spec, tile_rows=37)
    with pytest.raises(ValueError, match="packed must be"):
        native_rng.fused_read_(*args, out, _spec(group=24), tile_rows=37)
    with pytest.raises(ValueError, match="do not cover"):
        native_rng.fused_read_(*args, out, spec, tile_rows=20)
    with pytest.raises(ValueError, match="s_in"):
        native_rng.fused_read_(args[0], args[1][:, :-1], *args[2:], out, spec, tile_rows=37)
    with pytest.raises(ValueError, match="x must be"):
        native_rng.fused_read_(args[0].double(), *args[1:], out, spec, tile_rows=37)
    with pytest.raises(ValueError, match="mode"):
        native_rng.fused_read_(*args, out, _spec(mode=2), tile_rows=37)
    with pytest.raises(ValueError, match="smaller than the kernel"):
        native_rng.fused_conv_read_(
            torch.zeros(1, 4, 2, 2),
            torch.ones(1, 1),
            packed,
            args[3][:1],
            out,
            spec,
            cpt=4,
            kernel_size=(3, 3),
            stride=(1, 1),
            dilation=(1, 1),
        )
