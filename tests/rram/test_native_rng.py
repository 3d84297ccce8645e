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


def np_hash64(i: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The documented hash of 64-bit counters ``i``: h(h(i_lo + lo) ^ hi ^ h(i_hi)) on their
    low and high 32 bits (h(0) = 0: h(h(i + lo) ^ hi) below 2^32)."""
    i = np.asarray(i, dtype=np.uint64)
    i_lo = (i & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    i_hi = (i >> np.uint64(32)).astype(np.uint32)
    with np.errstate(over="ignore"):
        return _np_h32(_np_h32(i_lo + np.uint32(lo)) ^ np.uint32(hi) ^ _np_h32(i_hi))


def np_stream(n: int, lo: int, hi: int, offset: int = 0) -> np.ndarray:
    """The documented stream in float64 NumPy: Box-Muller on hashed pair counters (pair p
    hashes the 64-bit counters 2 (p + offset) and 2 (p + offset) + 1)."""
    npairs = (n + 1) // 2
    i2 = (np.arange(npairs, dtype=np.uint64) + np.uint64(offset)) * np.uint64(2)
    a = np_hash64(i2, lo, hi)
    b = np_hash64(i2 + np.uint64(1), lo, hi)
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


def np_fused_read(
    a,
    s_in,
    w,
    col_scale,
    *,
    group,
    levels,
    dac_levels,
    fixed,
    noise_std,
    key,
    rows,
    offset=0,
    var=None,
):
    """Float64 NumPy reference of one fused read of code-unit inputs ``a`` (B, T, K):
    per tile t, ADC group and row, the partial sums plus keyed read noise, the ADC, the
    de-quantisation and column scale, summed over t. Also returns, per output, the sum
    over t of one ADC step (float32 rounding may move a sum across one decision)."""
    b, t_tiles, _ = a.shape
    c = w.shape[-1]
    out, steps = np.zeros((b, c)), np.zeros((b, c))
    for t in range(t_tiles):
        u = a[:, t] @ w[t]
        sd2 = (noise_std * np.linalg.norm(a[:, t], axis=1))[:, None] ** 2  # (B, 1)
        if var is not None:  # state-dependent: + codes^2 @ V per partial sum
            sd2 = sd2 + (a[:, t] ** 2) @ var[t]
        sd = np.broadcast_to(np.sqrt(sd2), (b, c))
        for g0 in range(0, c, group):
            g1 = min(g0 + group, c)
            for r in range(b):
                v = u[r, g0:g1].copy()
                if noise_std > 0 or var is not None:
                    counter = offset + (t * rows + r) * c + g0
                    v += sd[r, g0:g1] * np_stream(g1 - g0, *key, offset=counter)
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
    ("group", "fixed", "noise_std"),
    # strips of 16 columns per group: 4 (pairs only), 2+2+1, 3+1 (pair and single), 1
    [(50, None, 0.0), (24, None, 0.02), (40, None, 0.02), (16, 3000.0, 0.02)],
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


# ----- 64-bit noise counters ----------------------------------------------------------------
def _np_stream32(n: int, lo: int, hi: int, offset: int = 0) -> np.ndarray:
    """The stream as it was with 32-bit counters (2 (p + offset) wrapping at 2^32)."""
    npairs = (n + 1) // 2
    with np.errstate(over="ignore"):
        i2 = (np.arange(npairs, dtype=np.uint32) + np.uint32(offset)) * np.uint32(2)
        a = _np_h32(_np_h32(i2 + np.uint32(lo)) ^ np.uint32(hi))
        b = _np_h32(_np_h32(i2 + np.uint32(1) + np.uint32(lo)) ^ np.uint32(hi))
    u1 = ((a >> np.uint32(8)).astype(np.float64) + 0.5) / 2**24
    u2 = (b >> np.uint32(8)).astype(np.float64) / 2**24
    r = np.sqrt(-2 * np.log(u1))
    cos, sin = r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)
    return np.concatenate([cos[: n // 2], sin[: n // 2], cos[n // 2 :]])


def test_stream_below_2_31_pairs_is_the_32_bit_stream():
    # seeded results do not change: below 2^31 pairs the 64-bit counters hash as before
    for offset in (0, 12345, 2**31 - 501):
        want = _np_stream32(1001, 777, 888, offset)
        np.testing.assert_array_equal(np_stream(1001, 777, 888, offset), want)
        got = native_rng.fill_normal_(torch.empty(1001), 777, 888, offset=offset).numpy()
        np.testing.assert_allclose(got, want, atol=3e-3, rtol=0)


@pytest.mark.parametrize("offset", [2**31 - 300, 2**32 - 300, 2**33 + 5, 2**62 - 600])
def test_stream_counters_do_not_wrap_near_2_31_and_2_32(offset):
    # pairs offset .. offset + 500: counters 2p cross 2^32 (pair 2^31) and 2^33 (pair 2^32)
    n, lo, hi = 1000, 4242, 99
    got = native_rng.fill_normal_(torch.empty(n), lo, hi, offset=offset).numpy()
    want = np_stream(n, lo, hi, offset)
    assert np.median(np.abs(got - want)) < 1e-6
    np.testing.assert_allclose(got, want, atol=3e-3, rtol=0)
    # the draws 2^31 and 2^32 pairs on (counters + 2^32, + 2^33) are others: no repeats
    for shift in (2**31, 2**32):
        if offset + shift + n <= native_rng.INDEX_LIMIT:
            later = native_rng.fill_normal_(torch.empty(n), lo, hi, offset=offset + shift)
            assert np.mean(np.abs(later.numpy() - got) < 1e-6) < 0.01
    # the old 32-bit counters 2 (offset + p) mod 2^32 agree only below pair 2^31
    old = _np_stream32(n, lo, hi, offset % 2**32)
    below = (offset + np.arange(n) % (n // 2)) < 2**31
    np.testing.assert_array_equal(want[below], old[below])
    assert np.all(want[~below] != old[~below])


def test_fill_normal_offset_continues_a_draw():
    whole = native_rng.fill_normal_(torch.empty(2000), 5, 6).numpy()
    part = native_rng.fill_normal_(torch.empty(200), 5, 6, offset=300).numpy()
    # pairs 300 .. 399: cosines at whole[300:400], sines at whole[1300:1400] (up to an ulp:
    # vector and scalar logf / cosf)
    np.testing.assert_allclose(part[:100], whole[300:400], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(part[100:], whole[1300:1400], rtol=1e-6, atol=1e-6)


def _noise_read(offset, *, b=6, t=2, k=8, c=40, group=16):
    """A noise-dominated fused read (weights 0: each output is its quantised noise)
    with its first pair counter at ``offset``, and its float64 reference."""
    rng = np.random.default_rng(1)
    x = rng.uniform(0.5, 1.0, (b, t * k)).astype(np.float32)
    w = np.zeros((t, k, c), dtype=np.float32)
    col_scale = np.ones((t, c), dtype=np.float32)
    s_in = np.abs(x.reshape(b, t, k)).max(-1).T.copy()
    codes = np.clip(np.round(x.reshape(b, t, k) * (np.float32(127) / s_in.T[..., None])), -127, 127)
    spec = _spec(group=group, noise_std=1.0, levels=2**15 - 1, dac_levels=127, fixed_full=4096.0)
    spec = native_rng.ReadSpec(**{**spec.__dict__, "key": (31337, 4711)})
    out = torch.empty(b, c)
    native_rng.fused_read_(
        torch.from_numpy(x),
        torch.from_numpy(s_in),
        native_rng.pack_weights(torch.from_numpy(w), group),
        torch.from_numpy(col_scale),
        out,
        spec,
        tile_rows=k,
        noise_offset=offset,
    )
    want, steps = np_fused_read(
        codes.astype(np.float64),
        s_in,
        w,
        col_scale,
        group=group,
        levels=spec.levels,
        dac_levels=spec.dac_levels,
        fixed=spec.fixed_full,
        noise_std=spec.noise_std,
        key=spec.key,
        rows=b,
        offset=offset,
    )
    return out.numpy(), want, steps


@pytest.mark.parametrize("base", [0, 2**31, 2**32, 2**40])
def test_fused_read_noise_counters_do_not_wrap_at_2_31_or_2_32(base):
    # the read's 480 pair counters straddle base (pair 2^31: counter 2^32; pair 2^32)
    offset = max(base - 240, 0)
    got, want, steps = _noise_read(offset)
    assert np.all(np.abs(got - want) <= steps + 1e-4 * np.abs(want) + 1e-5)
    for shift in (2**31, 2**32):  # the draws 2^31 / 2^32 pairs on are not the same ones
        later, _, _ = _noise_read(offset + shift)
        assert np.mean(np.abs(later - got) <= steps) < 0.05


def test_fused_read_noise_offset_is_bounded_by_index_limit():
    x, _, w, col_scale, s_in = _read_case(5)
    args = [torch.from_numpy(v) for v in (x, s_in)]
    packed = native_rng.pack_weights(torch.from_numpy(w), 16)
    out = torch.empty(13, 50)
    counters = 3 * 13 * 50
    spec = _spec(noise_std=0.1, key=(1, 2))
    top = native_rng.INDEX_LIMIT - counters
    native_rng.fused_read_(
        *args, packed, torch.from_numpy(col_scale), out, spec, tile_rows=37, noise_offset=top
    )
    assert torch.isfinite(out).all()
    for bad in (top + 1, -1, 2**64, 1.5):
        with pytest.raises(ValueError, match="noise_offset"):
            native_rng.fused_read_(
                *args,
                packed,
                torch.from_numpy(col_scale),
                out,
                spec,
                tile_rows=37,
                noise_offset=bad,
            )


# ----- operand checks of every entry point (never a crash) ----------------------------------
META = torch.device("meta")  # not CPU memory: must never reach the kernels


@pytest.mark.parametrize(
    ("argument", "call"),
    [
        ("out", lambda: native_rng.fill_normal_(torch.empty(10, dtype=torch.float64), 1, 2)),
        ("out", lambda: native_rng.fill_normal_(torch.empty(10, 4).t(), 1, 2)),
        ("out", lambda: native_rng.fill_normal_(torch.empty(10, device=META), 1, 2)),
        ("out", lambda: native_rng.fill_normal_(np.zeros(10, np.float32), 1, 2)),
        ("lo", lambda: native_rng.fill_normal_(torch.empty(10), 1.5, 2)),
        ("offset", lambda: native_rng.fill_normal_(torch.empty(10), 1, 2, offset=-1)),
        ("offset", lambda: native_rng.fill_normal_(torch.empty(10), 1, 2, offset=2**62)),
        ("w", lambda: native_rng.pack_weights(torch.zeros(4, 5), 16)),
        ("w", lambda: native_rng.pack_weights(torch.zeros(2, 4, 5, dtype=torch.float64), 16)),
        ("w", lambda: native_rng.pack_weights(torch.zeros(2, 4, 5, device=META), 16)),
        ("group", lambda: native_rng.pack_weights(torch.zeros(2, 4, 5), 0)),
        ("group", lambda: native_rng.pack_weights(torch.zeros(2, 4, 5), -3)),
        ("group", lambda: native_rng.pack_weights(torch.zeros(2, 4, 5), 2**70)),
        ("group", lambda: native_rng.pack_weights(torch.zeros(2, 4, 5), 16.0)),
        ("x", lambda: native_rng.tile_absmax(torch.zeros(3, 8, dtype=torch.float64), 4, 2)),
        ("x", lambda: native_rng.tile_absmax(torch.zeros(8, 3).t(), 4, 2)),
        ("x", lambda: native_rng.tile_absmax(torch.zeros(3, 8, device=META), 4, 2)),
        ("cpt", lambda: native_rng.tile_absmax(torch.zeros(3, 8), 0, 2)),
        ("cpt", lambda: native_rng.tile_absmax(torch.zeros(3, 8), -4, 2)),
        ("tiles", lambda: native_rng.tile_absmax(torch.zeros(3, 8), 4, 0)),
        ("tiles", lambda: native_rng.tile_absmax(torch.zeros(3, 8), 4, 3)),
        ("tiles", lambda: native_rng.tile_absmax(torch.zeros(3, 8), 2**62, 2**62)),
    ],
)
def test_small_entry_points_reject_bad_operands_naming_them(argument, call):
    with pytest.raises(ValueError, match=rf"\b{argument}\b"):
        call()


def test_pack_weights_of_a_view_and_of_a_group_wider_than_the_columns():
    w = torch.randn(2, 5, 40)
    view = torch.randn(40, 5, 2).permute(2, 1, 0)  # not contiguous: packed from a copy
    assert torch.equal(
        native_rng.pack_weights(view, 16), native_rng.pack_weights(view.contiguous(), 16)
    )
    # any group >= C is one group of all C columns (no allocation of the group's size)
    assert torch.equal(native_rng.pack_weights(w, 2**62), native_rng.pack_weights(w, 40))
    assert native_rng.packed_size(2, 5, 40, 2**62) == native_rng.packed_size(2, 5, 40, 40)


def _fused_operands():
    x, _, w, col_scale, s_in = _read_case(5)
    return dict(
        x=torch.from_numpy(x),
        s_in=torch.from_numpy(s_in),
        packed=native_rng.pack_weights(torch.from_numpy(w), 16),
        col_scale=torch.from_numpy(col_scale),
        out=torch.empty(x.shape[0], w.shape[-1]),
        spec=_spec(noise_std=0.1),
    )


def _respec(**changes):
    return lambda ops: ops.update(spec=native_rng.ReadSpec(**{**ops["spec"].__dict__, **changes}))


def _set(name, make):
    return lambda ops: ops.update({name: make(ops[name])})


FUSED_BAD = [
    ("x", _set("x", lambda x: x.double())),
    ("x", _set("x", lambda x: x.t().contiguous().t())),
    ("x", _set("x", lambda x: x.to(META))),
    ("x", _set("x", lambda x: x[None])),
    ("s_in", _set("s_in", lambda s: s[:, :-1])),
    ("s_in", _set("s_in", lambda s: s.double())),
    ("s_in", _set("s_in", lambda s: s.t().contiguous().t())),
    ("s_in", _set("s_in", lambda s: s.to(META))),
    ("col_scale", _set("col_scale", lambda c: c[0])),
    ("col_scale", _set("col_scale", lambda c: c[:, :-1])),
    ("col_scale", _set("col_scale", lambda c: c.double())),
    ("col_scale", _set("col_scale", lambda c: c.t().contiguous().t())),
    ("col_scale", _set("col_scale", lambda c: c[:0])),
    ("packed", _set("packed", lambda p: p[:-16])),
    ("packed", _set("packed", lambda p: p.to(META))),
    ("packed", _set("packed", lambda p: p.double())),
    ("packed", _set("packed", lambda p: torch.empty(2 * p.numel())[::2])),
    ("packed", _set("packed", lambda p: torch.empty(p.numel() + 1)[1:])),  # misaligned
    ("out", _set("out", lambda o: o[:, :-1])),
    ("out", _set("out", lambda o: o[:-1])),
    ("out", _set("out", lambda o: o.double())),
    ("out", _set("out", lambda o: o.t().contiguous().t())),  # column stride != 1
    ("out", _set("out", lambda o: o[:1].expand_as(o))),  # rows overlap (stride 0)
    ("out", _set("out", lambda o: o.to(META))),
    ("out", lambda ops: ops.update(out=ops["x"][:, :50])),  # out is x's memory
    ("spec", _set("spec", lambda s: s.__dict__)),
    ("spec.group", _respec(group=0)),  # a division by zero in C
    ("spec.group", _respec(group=-16)),
    ("spec.levels", _respec(levels=0)),
    ("spec.dac_levels", _respec(dac_levels=float("nan"))),
    ("spec.noise_std", _respec(noise_std=-1.0)),
    ("spec.noise_std", _respec(noise_std=float("inf"))),
    ("spec.fixed_full", _respec(fixed_full=0.0)),
    ("spec.key", _respec(key=(1,))),
    ("spec.key", _respec(key=(1.0, 2))),
    ("spec.mode", _respec(mode=2)),
]


@pytest.mark.parametrize(("argument", "change"), FUSED_BAD)
def test_fused_read_rejects_bad_operands_naming_them(argument, change):
    ops = _fused_operands()
    change(ops)
    spec = ops.pop("spec")
    with pytest.raises(ValueError, match=rf"(^|\W){argument}\b"):
        native_rng.fused_read_(*ops.values(), spec, tile_rows=37)


@pytest.mark.parametrize("tile_rows", [0, -37, 2**70, 37.0, 20, 60])
def test_fused_read_rejects_bad_tile_rows(tile_rows):
    ops = _fused_operands()
    spec = ops.pop("spec")
    with pytest.raises(ValueError, match=r"tile_rows|do not cover"):
        native_rng.fused_read_(*ops.values(), spec, tile_rows=tile_rows)


def _conv_operands(n=2, c_in=3, h=8, w=4, kernel=(3, 1), t=1, c=5):
    cpt = -(-c_in // t)
    wts = torch.randn(t, cpt * kernel[0] * kernel[1], c) * 0.1
    x = torch.randn(n, c_in, h, w)
    return dict(
        x=x,
        s_in=native_rng.tile_absmax(x, cpt, t),
        packed=native_rng.pack_weights(wts, 16),
        col_scale=torch.ones(t, c),
        cpt=cpt,
    )


def _conv(ops, out, *, kernel=(3, 1), stride=(1, 1), dilation=(1, 1), spec=None):
    native_rng.fused_conv_read_(
        ops["x"],
        ops["s_in"],
        ops["packed"],
        ops["col_scale"],
        out,
        spec or _spec(noise_std=0.1, key=(1, 2)),
        cpt=ops["cpt"],
        kernel_size=kernel,
        stride=stride,
        dilation=dilation,
    )


@pytest.mark.parametrize(
    ("argument", "geometry"),
    [
        ("dilation", dict(dilation=(-10000000, 1))),  # segfaulted
        ("dilation", dict(dilation=(-2, -2))),  # read outside the image (13 x 13 from 9 x 9)
        ("dilation", dict(dilation=(0, 1))),
        ("dilation", dict(dilation=(1, 2**70))),
        ("dilation", dict(dilation=(1, 1, 1))),
        ("dilation", dict(dilation=(1.0, 1))),
        ("stride", dict(stride=(0, 1))),
        ("stride", dict(stride=(1, -1))),
        ("stride", dict(stride=-3)),
        ("stride", dict(stride=(2**70, 1))),
        ("kernel_size", dict(kernel=(0, 1))),
        ("kernel_size", dict(kernel=(-3, 1))),
        ("kernel_size", dict(kernel=(3, 2**64))),
        ("smaller", dict(dilation=(2**40, 1))),  # huge, but an int64
        ("smaller", dict(kernel=(9, 1))),
    ],
)
def test_fused_conv_read_rejects_bad_geometry_naming_it(argument, geometry):
    ops = _conv_operands()
    out = torch.full((2 * 6 * 4, 5), float("nan"))
    with pytest.raises(ValueError, match=argument):
        _conv(ops, out, **geometry)
    assert torch.isnan(out).all()  # nothing written


@pytest.mark.parametrize(
    ("size", "kernel", "dilation"), [((9, 9), (3, 3), (-2, -2)), ((8, 4), (3, 1), (-10000000, 1))]
)
def test_fused_conv_read_rejects_negative_dilations_with_the_out_they_imply(size, kernel, dilation):
    # the two reported cases, with the output a layer would allocate for them (13 x 13 from
    # 9 x 9; 20000008 x 4 from 8 x 4, never touched): it read outside x, or crashed
    (h, w), (kh, kw), (dh, dw) = size, kernel, dilation
    oh, ow = h - dh * (kh - 1), w - dw * (kw - 1)
    x = torch.randn(1, 1, h, w)
    packed = native_rng.pack_weights(torch.randn(1, kh * kw, 1), 1)
    spec = _spec(group=1, noise_std=0.1, key=(1, 2))
    out = torch.empty(oh * ow, 1)
    with pytest.raises(ValueError, match="dilation"):
        native_rng.fused_conv_read_(
            x,
            native_rng.tile_absmax(x, 1, 1),
            packed,
            torch.ones(1, 1),
            out,
            spec,
            cpt=1,
            kernel_size=kernel,
            stride=(1, 1),
            dilation=dilation,
        )


def test_fused_conv_read_rejects_inconsistent_shapes_naming_them():
    ops = _conv_operands()
    out = torch.empty(2 * 6 * 4, 5)
    _conv(ops, out)  # valid
    with pytest.raises(ValueError, match="out must be"):
        _conv(ops, torch.empty(2 * 7 * 4, 5))  # the rows of another output size
    with pytest.raises(ValueError, match="packed must be"):
        _conv(ops, out, kernel=(2, 1), dilation=(2, 1))  # same output size, other K
    with pytest.raises(ValueError, match="s_in"):
        _conv({**ops, "s_in": ops["s_in"][:, :1]}, out)
    with pytest.raises(ValueError, match="cpt"):
        _conv({**ops, "cpt": 0}, out)
    with pytest.raises(ValueError, match="do not cover"):
        _conv({**ops, "cpt": 2}, out)
    with pytest.raises(ValueError, match="x must be"):
        _conv({**ops, "x": ops["x"].transpose(2, 3)}, out)
    with pytest.raises(ValueError, match="x must be"):
        _conv({**ops, "x": ops["x"][0]}, out)


def test_fused_conv_read_takes_a_stride_past_the_image_as_one_output():
    ops = _conv_operands()
    one = torch.empty(2 * 1 * 1, 5)
    _conv(ops, one, stride=(8, 4))
    huge = torch.empty(2 * 1 * 1, 5)
    _conv(ops, huge, stride=(2**40, 2**62))
    assert torch.equal(one, huge)


# ----- reads of no rows -----------------------------------------------------------------------
def test_empty_batches_return_at_once_leaving_out_untouched():
    ops = _fused_operands()
    spec = ops.pop("spec")
    x, s_in = ops["x"][:0], ops["s_in"][:, :0].contiguous()
    assert native_rng.tile_absmax(x, 37, 3).shape == (3, 0)  # was an IndexError
    out = torch.empty(0, 50)
    native_rng.fused_read_(x, s_in, ops["packed"], ops["col_scale"], out, spec, tile_rows=37)
    assert native_rng.fill_normal_(torch.empty(0), 1, 2).shape == (0,)
    assert native_rng.pack_weights(torch.zeros(0, 37, 50), 16).shape == (0,)
    conv = _conv_operands(n=0)
    assert conv["s_in"].shape == (1, 0)
    _conv(conv, torch.empty(0, 5))
    # no output columns: nothing to do either
    cols = _conv_operands(c=0)
    _conv({**cols, "col_scale": torch.ones(1, 0)}, torch.empty(2 * 6 * 4, 0))


_ISA_SCRIPT = """
import sys, numpy as np, torch
from sedma_torch.rram import native_rng
rng = np.random.default_rng(7)
x = torch.from_numpy((rng.standard_normal((19, 90)) * 2).astype(np.float32))
w = torch.from_numpy((rng.standard_normal((3, 30, 70)) * 0.1).astype(np.float32))
cs = torch.from_numpy(rng.uniform(0.5, 2.0, (3, 70)).astype(np.float32))
s_in = native_rng.tile_absmax(x, 30, 3)
out = torch.empty(19, 70)
spec = native_rng.ReadSpec(group=56, quantise=True, noise_std=0.05, levels=2**15 - 1,
                           dac_levels=127, fixed_full=None, key=(11, 22))
native_rng.fused_read_(x, s_in, native_rng.pack_weights(w, 56), cs, out, spec, tile_rows=30)
np.save(sys.argv[1], out.numpy())
"""


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512" or not native_rng.available(),
    reason="needs an AVX-512 CPU and a C compiler",
)
def test_avx512_and_avx2_builds_of_the_fused_read_agree(tmp_path):
    """The AVX-512 register block (two strips at once) against the AVX2 build of the same
    source (SEDMA_NATIVE_AVX512=0): same read, up to float rounding of the sums."""
    outs = []
    for flag in ("1", "0"):
        target = tmp_path / f"out_{flag}.npy"
        env = {**os.environ, "SEDMA_NATIVE_AVX512": flag, "SEDMA_CACHE_DIR": str(tmp_path / flag)}
        subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT, str(target)], env=env, check=True, timeout=300
        )
        outs.append(np.load(target))
    built = {p.parent.name: p.name for p in tmp_path.glob("*/*.so")}
    assert set(built) == {"0", "1"} and built["0"] != built["1"]  # two different builds
    # the 15-bit ADC makes float-rounding differences of the sums at most one ADC step
    step = np.abs(outs[1]).max() / (2**15 - 1) * 4
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=step)
    # an auto-ranged group's full scale may differ in its last bit, so most values differ
    # by rounding; an ADC decision flips only rarely
    assert np.mean(np.abs(outs[0] - outs[1]) > 1e-5 * (np.abs(outs[1]) + 1e-3)) < 0.02


@pytest.mark.parametrize(("group", "noise_std"), [(24, 0.0), (40, 0.01), (16, 0.0)])
def test_fused_read_with_state_dependent_variances_equals_numpy_reference(group, noise_std):
    # packed_var: a variance per weight, so each partial sum's noise std is
    # sqrt(noise_std^2 ||codes||^2 + codes^2 @ V) -- same stream, same counters
    x, xt, w, col_scale, s_in = _read_case(70 + group)
    var = (np.random.default_rng(group).uniform(0, 4e-4, w.shape)).astype(np.float32)
    dac_levels, levels, key = 31, 2**13 - 1, (4242, 99)
    codes = np.clip(np.round(xt * (np.float32(dac_levels) / s_in.T[..., None])), -31, 31)
    want, steps = np_fused_read(
        codes.astype(np.float64),
        s_in,
        w,
        col_scale,
        group=group,
        levels=levels,
        dac_levels=dac_levels,
        fixed=None,
        noise_std=noise_std,
        key=key,
        rows=x.shape[0],
        var=var.astype(np.float64),
    )
    out = torch.empty(x.shape[0], w.shape[-1])
    spec = _spec(group=group, noise_std=noise_std, levels=levels, dac_levels=dac_levels, key=key)
    native_rng.fused_read_(
        torch.from_numpy(x),
        torch.from_numpy(s_in),
        native_rng.pack_weights(torch.from_numpy(w), group),
        torch.from_numpy(col_scale),
        out,
        spec,
        tile_rows=37,
        packed_var=native_rng.pack_weights(torch.from_numpy(var), group),
    )
    err = np.abs(out.numpy() - want)
    assert np.all(err <= steps + 1e-4 * np.abs(want) + 1e-5)
    # the noise is there: without packed_var the read differs by far more than an ADC step
    quiet = torch.empty_like(out)
    native_rng.fused_read_(
        torch.from_numpy(x),
        torch.from_numpy(s_in),
        native_rng.pack_weights(torch.from_numpy(w), group),
        torch.from_numpy(col_scale),
        quiet,
        spec,
        tile_rows=37,
    )
    assert float((quiet - out).abs().mean()) > 10 * float(np.mean(steps))


def test_fused_read_rejects_a_packed_var_of_another_size():
    x, _, w, col_scale, s_in = _read_case(3)
    packed = native_rng.pack_weights(torch.from_numpy(w), 16)
    with pytest.raises(ValueError, match="packed_var must be pack_weights"):
        native_rng.fused_read_(
            torch.from_numpy(x),
            torch.from_numpy(s_in),
            packed,
            torch.from_numpy(col_scale),
            torch.empty(x.shape[0], w.shape[-1]),
            _spec(group=16),
            tile_rows=37,
            packed_var=packed[:-16].clone(),
        )


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32, round to nearest even (finite values)."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


@pytest.mark.skipif(not native_rng.bf16_variance(), reason="needs an AVX512_BF16 CPU")
@pytest.mark.parametrize(
    ("group", "noise_std", "k"), [(24, 0.0, 37), (40, 0.01, 37), (16, 0.0, 36)]
)
def test_bfloat16_variance_product_equals_the_reference_of_its_rounded_operands(
    group, noise_std, k
):
    # pack_variances on an AVX512_BF16 CPU: codes^2 and V rounded to bfloat16 (nearest
    # even), products summed in float32. One tile, so each output's noise is one keyed draw
    # z times its std: the read's noise must be the float32 path's draw scaled by
    # sqrt(variance of the rounded operands / exact variance), which is within 2^-9 of 1
    x, xt, w, col_scale, s_in = _read_case(90 + group, t=1, k=k, c_in=k - 3)
    var = np.random.default_rng(group).uniform(0, 4e-4, w.shape).astype(np.float32)
    var[:, :5] = 0.0  # zero-variance rows stay zero
    dac_levels, levels, key = 31, 2**22 - 1, (4243, 98)
    codes = np.clip(np.round(xt * (np.float32(dac_levels) / s_in.T[..., None])), -31, 31)
    c64 = codes.astype(np.float64)[:, 0]  # (B, K): the one tile
    common = dict(
        group=group, levels=levels, dac_levels=dac_levels, fixed=None, key=key, rows=x.shape[0]
    )
    packed_var = native_rng.pack_variances(torch.from_numpy(var), group)
    assert packed_var.dtype == torch.bfloat16
    assert packed_var.numel() == native_rng.packed_var_bf16_size(1, k, 50, group)
    out = torch.empty(x.shape[0], w.shape[-1])
    spec = _spec(group=group, noise_std=noise_std, levels=levels, dac_levels=dac_levels, key=key)
    native_rng.fused_read_(
        torch.from_numpy(x),
        torch.from_numpy(s_in),
        native_rng.pack_weights(torch.from_numpy(w), group),
        torch.from_numpy(col_scale),
        out,
        spec,
        tile_rows=k,
        packed_var=packed_var,
    )
    a3 = c64[:, None, :]
    quiet, steps = np_fused_read(a3, s_in, w, col_scale, noise_std=0.0, **common)
    exact, _ = np_fused_read(
        a3, s_in, w, col_scale, noise_std=noise_std, var=var.astype(np.float64), **common
    )
    base = (noise_std * np.linalg.norm(c64, axis=1))[:, None] ** 2
    exact_var = base + c64**2 @ var[0].astype(np.float64)
    sq = _bf16((codes[:, 0] ** 2).astype(np.float32)).astype(np.float64)
    rounded_var = base + sq @ _bf16(var[0]).astype(np.float64)
    scale = np.sqrt(rounded_var / exact_var)
    assert np.all(np.abs(scale - 1) <= 2.0**-9) and np.abs(scale - 1).max() > 0
    want = quiet + (exact - quiet) * scale
    err = np.abs(out.numpy() - want)
    # float32 sums: a few ADC steps and 1e-5 of the noise
    assert np.all(err <= 4 * steps + 1e-5 * np.abs(exact - quiet) + 1e-6), float(err.max())
    # and the rounding shows: the exact-variance read is further off than that
    assert np.abs(out.numpy() - exact).max() > 10 * err.max()


def test_fused_read_rejects_a_bfloat16_packed_var_of_another_size():
    x, _, w, col_scale, s_in = _read_case(4)
    args = (
        torch.from_numpy(x),
        torch.from_numpy(s_in),
        native_rng.pack_weights(torch.from_numpy(w), 16),
        torch.from_numpy(col_scale),
        torch.empty(x.shape[0], w.shape[-1]),
        _spec(group=16),
    )
    with pytest.raises(ValueError, match="bfloat16 packed_var"):
        native_rng.fused_read_(
            *args, tile_rows=37, packed_var=torch.zeros(1000, dtype=torch.bfloat16)
        )


@pytest.mark.skipif(
    not native_rng._cpu_has_avx512_bf16() or torch.backends.cpu.get_cpu_capability() != "AVX512",
    reason="needs an AVX512_BF16 CPU",
)
def test_a_compiler_without_bfloat16_still_builds_the_kernels_with_float32_variances(tmp_path):
    # a compiler that rejects -mavx512bf16 (older GCC / clang): the kernels build without
    # it and pack the variances in float32 instead of falling back to PyTorch
    cc = tmp_path / "cc"
    cc.write_text('#!/bin/sh\ncase "$*" in *-mavx512bf16*) exit 1;; esac\nexec gcc "$@"\n')
    cc.chmod(0o755)
    script = (
        "import torch; from sedma_torch.rram import native_rng as n; "
        "v = n.pack_variances(torch.rand(2, 5, 20), 16); "
        "print(n.available(), n.bf16_variance(), v.dtype)"
    )
    env = {**os.environ, "CC": str(cc), "SEDMA_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False", "torch.float32"], done.stdout + done.stderr
