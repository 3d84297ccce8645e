"""The crossbar read of a depthwise convolution on CPU float32 as one compiled C kernel,
used through ctypes.

Why: a depthwise convolution (``groups == in_channels``, each channel filtered on its own
by ``m = out_channels / groups`` kernels) maps every channel to its own input tile of
``kh * kw`` rows and ``m`` columns. The PyTorch path runs it as a grouped convolution of
the DAC codes, a second one for the read-noise norms, then eager passes for noise, ADC,
de-quantisation and the column scale over a channels-last partial-sum stack: about 3x the
time of ``nn.Conv2d`` (NCHW), and more than half of a converted EfficientNet-Lite0's
forward. Here one pass per image and channel (OpenMP threads over them; blocks of 8
channels for channels-last images) does the whole read while the channel's plane is in
cache:

1. the DAC converts the (spatially padded) input plane to code units, ``v * dac_levels /
   s_in`` (``s_in`` given, or the plane's largest ``|v|``), rounded and clipped to
   ``+-dac_levels`` (or at full precision: first-order correction's exact input), into a
   buffer split into ``sh * sw`` stride phases so that every kernel tap reads a contiguous
   run of inputs for consecutive output pixels;
2. per output pixel (8 at a time in AVX2 registers, all taps) the ``kh x kw`` window
   product with each of the ``m`` weight columns and the window's sum of squared codes;
3. read noise of standard deviation ``noise_std * ||window codes||`` on each column output
   (the counter-based stream below), the column ADC over each group of ``group`` of the
   ``m`` columns (auto-range: the group's largest ``|output|``, or a fixed saturating full
   scale), de-quantisation ``* full * s_in / (levels * dac_levels)`` and the column scale,
   written to, added to or subtracted from the NCHW output (first-order correction's three
   reads).

The arithmetic is that of :meth:`sedma_torch.rram.layers.RRAMConv2d._tiled_read` (and of
:func:`sedma_torch.rram.native_rng.fused_conv_read_`) up to float rounding; the tests
check it against a float64 NumPy reference, noise stream included.

**Noise stream.** The read noise of output element ``e`` -- the flat NCHW index
``((n * C_out + o) * H' + y) * W' + x`` of output channel ``o = t * m + j`` (channel t,
column j) -- is a standard normal keyed by two 31-bit words ``(lo, hi)`` (one key per
read): counters come in blocks of 16, and pair ``q = 8 (e >> 4) + (e & 7)`` hashes the
64-bit counters ``2q`` and ``2q + 1`` with two rounds of the 32-bit ``lowbias32`` hash each
(``h(h(i_lo + lo) ^ hi ^ h(i_hi))`` for the low and high 32 bits of counter i, which is
``h(h(i + lo) ^ hi)`` below ``2^32``, as :mod:`~sedma_torch.rram.native_rng`: the stream
never repeats), giving 24-bit uniforms ``u1`` in (0, 1),
``u2`` in [0, 1) and ``r = sqrt(-2 ln u1)``; element e gets ``r cos(2 pi u2)`` when
``e & 8 == 0``, else ``r sin(2 pi u2)`` (inline float32 polynomials for the logarithm and
the sine/cosine, accurate to a few ulp). So each Box-Muller pair feeds two elements 8
apart and any element's draw can be computed on its own, whatever the threading.

The library is built from ``kernels/depthwise.c`` (package data; the shared helpers
spliced in by :func:`sedma_torch.rram.native_rng.kernel_source`) by
:func:`sedma_torch.rram.native_rng.build_library` (system C compiler, cached per machine).
Without a compiler, or with ``SEDMA_NATIVE_RNG=0``, the layer uses the PyTorch path (same
physics, other noise streams).
"""

from __future__ import annotations

import ctypes

import torch

from . import native_rng

_SOURCE = native_rng.kernel_source("depthwise.c")
"""The C source of the depthwise read (``kernels/depthwise.c``)."""


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, u32, ptr, cint = (
        ctypes.c_int64,
        ctypes.c_float,
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_int,
    )
    read = lib.sedma_depthwise_read_f32
    read.argtypes = [ptr, ptr, cint, i64, ptr, ptr, ptr, ptr, i64, cint, f32, f32, f32, f32]
    read.argtypes += [ptr, u32, u32, ptr, cint, i64]
    read.restype = cint
    lib.sedma_depthwise_normals_f32.argtypes = [ptr, i64, i64, u32, u32]
    lib.sedma_depthwise_normals_f32.restype = cint


_KERNEL = native_rng.LazyLibrary(
    "native_depthwise", _SOURCE, _declare, "native depthwise read kernel"
)

MAX_OUTPUTS = native_rng.INDEX_LIMIT
"""Largest output of one read (elements), and bound on the first noise counter plus the
outputs: the noise counters are 64-bit, the C sizes int64."""


def available() -> bool:
    """True when the compiled kernel can be used (built on the first call). False with
    ``SEDMA_NATIVE_RNG=0`` or without a C compiler; a failed build warns once."""
    return _KERNEL.get() is not None


def _lib() -> ctypes.CDLL:
    lib = _KERNEL.get()
    if lib is None:
        raise RuntimeError("native depthwise read kernel unavailable; call available() first")
    return lib


_FUNC = "depthwise_read_"


def _check_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    native_rng.check_tensor(_FUNC, name, tensor, shape)


def depthwise_read_(
    x: torch.Tensor,
    s_in: torch.Tensor | None,
    weights: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: native_rng.ReadSpec,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    noise_offset: int = 0,
    variances: torch.Tensor | None = None,
) -> None:
    """One crossbar read of a depthwise convolution, into ``out``.

    Args:
        x: images (N, C, H, W), CPU float32, already padded spatially, contiguous NCHW or
            channels-last (NHWC memory; read a block of channels at a time, no copy).
            N = 0 (or no outputs at all) returns at once.
        s_in: (C, N) DAC full scale of each channel (input tile) and image, or None: the
            DAC auto-ranges, the largest ``|x|`` of each image's channel (1 where it is all
            zero; :func:`sedma_torch.rram.native_rng.tile_absmax`), found in the same pass.
        weights: (C, kh * kw, m) crossbar weights of each channel's tile, rows in (i, j)
            order, ``m`` columns (the channel multiplier) -- ``RRAMConv2d.w_read``.
        col_scale: (C, m) per-column scale of the tiles.
        out: (N, C * m, H', W') NCHW contiguous float32; output channel ``t * m + j`` is
            column j of channel t. Written, added to or subtracted from (``spec.mode``).
        spec: DAC rounding, read noise, ADC and mode
            (:class:`~sedma_torch.rram.native_rng.ReadSpec`).
        kernel_size, stride, dilation: of the convolution (its padding is already in ``x``),
            ints >= 1 or pairs; ``kh * kw`` must equal the rows of ``weights``, and ``H' =
            (H - dh (kh - 1) - 1) // sh + 1`` (W' alike) must be >= 1.
        noise_offset: the first noise counter (0 unless a read continues another's stream).
        variances: (C, kh * kw, m) read-noise variance of each weight (a state-dependent
            noise model, ``RRAMConv2d.w_var``), or None.

    The read noise of an output element has variance ``spec.noise_std^2`` times the
    squared norm of its window's codes, plus with ``variances`` the sum over the window of
    codes^2 times the weight's variance, and comes from the stream of the module docstring,
    keyed by ``spec.key`` with ``noise_offset`` + the element's flat NCHW index as counter.
    Every operand is checked before the kernel runs (``ValueError`` naming it).
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        raise ValueError(
            f"depthwise_read_: x must be a 4-d (N, C, H, W) tensor, got "
            f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}"
        )
    n, c, h, w = x.shape
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    stored = x.permute(0, 2, 3, 1) if channels_last else x  # in memory order
    if not stored.is_contiguous():
        raise ValueError("depthwise_read_: x must be contiguous, NCHW or channels-last")
    _check_tensor("x", stored, tuple(stored.shape))
    if not isinstance(weights, torch.Tensor) or weights.ndim != 3:
        raise ValueError("depthwise_read_: weights must be a 3-d (C, kh * kw, m) tensor")
    k, m = weights.shape[1:]
    _check_tensor("weights", weights, (c, k, m))
    if s_in is not None:
        _check_tensor("s_in", s_in, (c, n))
    _check_tensor("col_scale", col_scale, (c, m))
    if variances is not None:
        _check_tensor("variances", variances, (c, k, m))
    kh, kw = native_rng.check_pair(_FUNC, "kernel_size", kernel_size)
    sh, sw = native_rng.check_pair(_FUNC, "stride", stride)
    dh, dw = native_rng.check_pair(_FUNC, "dilation", dilation)
    if kh * kw != k:
        raise ValueError(
            f"depthwise_read_: kernel_size {kh}x{kw} does not match the {k} rows of weights"
        )
    native_rng.check_spec(_FUNC, spec)
    native_rng.check_adc_full(_FUNC, spec, c, -(-m // max(min(spec.group, m), 1)))
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"depthwise_read_: images {h}x{w} are smaller than the {kh}x{kw} kernel "
            f"(dilation {dh}x{dw})"
        )
    _check_tensor("out", out, (n, c * m, oh, ow))
    if out.numel() > MAX_OUTPUTS:
        raise ValueError(f"depthwise_read_: {out.numel()} outputs exceed {MAX_OUTPUTS}")
    noise_offset = native_rng.check_int(
        _FUNC, "noise_offset", noise_offset, 0, MAX_OUTPUTS - out.numel()
    )
    # the work and buffers the kernel sizes in int64: n C (H W + m H' W' kh kw)
    native_rng.check_products(_FUNC, "the work", n * c, h * w + m * oh * ow * k)
    native_rng.check_no_overlap(
        _FUNC,
        "out",
        out,
        x=x,
        s_in=s_in,
        weights=weights,
        col_scale=col_scale,
        variances=variances,
        adc_full=spec.adc_full,
    )
    if not available():
        raise RuntimeError("native depthwise read kernel unavailable")
    if out.numel() == 0:
        return
    # The same read with the sizes the kernel allocates bounded by the image: a stride
    # past the image (one output row or column) is the image's size, a dilation with one
    # tap is 1, a group wider than the m columns is m.
    sh, sw = min(sh, h), min(sw, w)
    dh, dw = dh if kh > 1 else 1, dw if kw > 1 else 1
    group = min(spec.group, m)
    geometry = torch.tensor([n, c, h, w, oh, ow, kh, kw, sh, sw, dh, dw], dtype=torch.int64)
    status = _lib().sedma_depthwise_read_f32(
        x.data_ptr(),
        geometry.data_ptr(),
        int(channels_last),
        m,
        weights.data_ptr(),
        None if variances is None else variances.data_ptr(),
        None if s_in is None else s_in.data_ptr(),
        col_scale.data_ptr(),
        group,
        int(bool(spec.quantise)),
        float(spec.noise_std),
        float(spec.levels),
        float(spec.dac_levels),
        -1.0 if spec.fixed_full is None else float(spec.fixed_full),
        None if spec.adc_full is None else spec.adc_full.data_ptr(),
        spec.key[0] & 0x7FFFFFFF,
        spec.key[1] & 0x7FFFFFFF,
        out.data_ptr(),
        spec.mode,
        noise_offset,
    )
    if status == -2:
        raise ValueError(f"depthwise_read_: the kernel rejected the geometry {geometry.tolist()}")
    if status != 0:
        raise MemoryError("depthwise_read_: out of memory")


def noise_stream(start: int, count: int, key: tuple[int, int]) -> torch.Tensor:
    """Elements ``start .. start + count - 1`` of the read-noise stream keyed by ``key``
    (module docstring): float32 (count,). Any range in [0, 2^62)."""
    start = native_rng.check_int("noise_stream", "start", start, 0, MAX_OUTPUTS)
    count = native_rng.check_int("noise_stream", "count", count, 0, MAX_OUTPUTS - start)
    if not (
        isinstance(key, (tuple, list))
        and len(key) == 2
        and all(isinstance(k, int) and not isinstance(k, bool) for k in key)
    ):
        raise ValueError(f"noise_stream: key must be two ints, got {key!r}")
    out = torch.empty(count, dtype=torch.float32)
    if count:
        status = _lib().sedma_depthwise_normals_f32(
            out.data_ptr(), start, count, key[0] & 0x7FFFFFFF, key[1] & 0x7FFFFFFF
        )
        if status != 0:
            raise MemoryError("noise_stream: out of memory")
    return out


__all__ = ["MAX_OUTPUTS", "available", "depthwise_read_", "noise_stream"]
