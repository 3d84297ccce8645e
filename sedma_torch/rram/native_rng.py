"""Fast Gaussian draws on CPU: a small C kernel compiled once per machine, used through ctypes.

Why: per-tile read noise needs one normal per tile output (T x batch x outputs), and
PyTorch's CPU generator (MT19937, serial) costs about as much as the layer's matmul --
the one cost that kept the RRAM read above 2x a digital ``nn.Linear``. This kernel is a
counter-based generator that the C compiler vectorises (8 lanes with AVX2, glibc's libmvec
for ``logf``/``cosf``): about 3x faster per core than ``Tensor.normal_`` here.

The stream: pair ``p`` of a draw keyed by two 31-bit words ``(lo, hi)`` hashes the
counters ``2p`` and ``2p + 1`` with two rounds of a 32-bit integer hash each
(``h(h(i + lo) ^ hi)``, the bijective xorshift-multiply ``lowbias32``), takes 24-bit
uniforms ``u1`` in (0, 1) and ``u2`` in [0, 1) and returns the Box-Muller pair
``r cos(2 pi u2)`` and ``r sin(2 pi u2)``, ``r = sqrt(-2 ln u1)``, with the sine taken as
``sign * sqrt(1 - cos^2)`` (absolute error below 4e-4 near the zeros of the sine). The
first output of pair p goes to ``out[p]``, the second to ``out[n // 2 + p]``. The tests
check it against a NumPy reimplementation and for mean, variance, normality and
independence.

The library is built with the system C compiler (``cc``, or ``$CC``) into
``$SEDMA_CACHE_DIR`` (default ``~/.cache/sedma_torch``) the first time it is needed
(about 0.2 s). Without a compiler, or with ``SEDMA_NATIVE_RNG=0``, callers fall back to
PyTorch's generator (same distribution, another stream).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>

static inline uint32_t h32(uint32_t x) {
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
  return x;
}

/* n normals: pair p (counter p + offset) -> out[p] (cosine) and out[n/2 + p] (sine). */
static void normal_pairs(float *restrict out, int64_t n, uint32_t lo, uint32_t hi,
                         uint32_t offset) {
  int64_t npairs = n / 2;
  #pragma omp simd
  for (int64_t p = 0; p < npairs; ++p) {
    uint32_t i2 = 2u * ((uint32_t)p + offset);
    uint32_t a = h32(h32(i2 + lo) ^ hi), b = h32(h32(i2 + 1u + lo) ^ hi);
    float u1 = ((float)(int32_t)(a >> 8) + 0.5f) * (1.0f / 16777216.0f);
    float u2 = (float)(int32_t)(b >> 8) * (1.0f / 16777216.0f);
    float r = sqrtf(-2.0f * logf(u1));
    float c = cosf(6.283185307179586f * u2);
    float s = sqrtf(fmaxf(1.0f - c * c, 0.0f));
    out[p] = r * c;
    out[npairs + p] = (u2 < 0.5f ? r : -r) * s;
  }
  if (n % 2) {  /* odd n: the cosine of pair npairs */
    uint32_t i2 = 2u * ((uint32_t)npairs + offset);
    uint32_t a = h32(h32(i2 + lo) ^ hi), b = h32(h32(i2 + 1u + lo) ^ hi);
    float u1 = ((float)(int32_t)(a >> 8) + 0.5f) * (1.0f / 16777216.0f);
    float u2 = (float)(int32_t)(b >> 8) * (1.0f / 16777216.0f);
    out[n - 1] = sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
  }
}

void sedma_normal_f32(float *restrict out, int64_t n, uint32_t lo, uint32_t hi) {
  normal_pairs(out, n, lo, hi, 0u);
}

/* Read noise, column ADC, de-quantisation, column scale and the digital sum over the T
   input tiles of one block of partial sums u (tile t, row r, column c at
   t * u_t_stride + r * u_r_stride + c), into out (rows, width; row stride out_stride):
   mode 0 writes, +1 adds, -1 subtracts. std and s_in are (T, ld) with
   the block's rows at [row0, row0 + rows); col_scale is (T, cs_stride) at the block's
   first column. Columns are grouped in ADC groups of `group`; fixed_full > 0 is a fixed
   ADC full scale (saturating), otherwise each group auto-ranges to its largest |value|.
   Rows run in parallel on OpenMP threads (each row's result does not depend on the
   split). The noise of row r of tile t, column c is keyed by the counter
   (t * noise_rows + noise_row0 + r) * noise_cols + noise_col0 + c. Returns 0, or -1 when
   out of memory. */
int sedma_read_epilogue_f32(const float *restrict u, int64_t T, int64_t u_t_stride,
                            int64_t u_r_stride, int64_t rows, int64_t width,
                            int64_t group, const float *std, const float *s_in, int64_t ld,
                            int64_t row0, const float *col_scale, int64_t cs_stride,
                            float levels, float dac_levels, float fixed_full,
                            uint32_t lo, uint32_t hi, int64_t noise_rows,
                            int64_t noise_row0, int64_t noise_cols, int64_t noise_col0,
                            float *restrict out, int64_t out_stride, int mode) {
  int status = 0;
  #pragma omp parallel if (rows * width * T >= 32768)
  {
  float *v = (float *)malloc(sizeof(float) * (size_t)width);
  if (!v) {
    #pragma omp atomic write
    status = -1;
  }
  #pragma omp for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    if (!v) continue;
    float *o = out + r * out_stride;
    for (int64_t t = 0; t < T; ++t) {
      const float *ur = u + t * u_t_stride + r * u_r_stride;
      const float *cs = col_scale + t * cs_stride;
      float si = s_in[t * ld + row0 + r];
      if (std) {
        float sd = std[t * ld + row0 + r];
        uint32_t counter = (uint32_t)((t * noise_rows + noise_row0 + r) * noise_cols
                                      + noise_col0);
        normal_pairs(v, width, lo, hi, counter);
        #pragma omp simd
        for (int64_t c = 0; c < width; ++c) v[c] = ur[c] + sd * v[c];
      } else {
        #pragma omp simd
        for (int64_t c = 0; c < width; ++c) v[c] = ur[c];
      }
      for (int64_t g0 = 0; g0 < width; g0 += group) {
        int64_t g1 = g0 + group < width ? g0 + group : width;
        float full = fixed_full;
        if (!(full > 0.0f)) {
          float m = 0.0f;
          #pragma omp simd reduction(max:m)
          for (int64_t c = g0; c < g1; ++c) m = fmaxf(m, fabsf(v[c]));
          full = m > 0.0f ? m : 1.0f;
        }
        float inv = levels / full;
        float scale = full * (si / (levels * dac_levels));
        int saturate = fixed_full > 0.0f;
        float sign = mode < 0 ? -1.0f : 1.0f;
        int first = (t == 0) && (mode == 0);
        #pragma omp simd
        for (int64_t c = g0; c < g1; ++c) {
          float q = rintf(v[c] * inv);
          if (saturate) q = fminf(fmaxf(q, -levels), levels);
          float val = sign * (q * scale * cs[c]);
          o[c] = first ? val : o[c] + val;
        }
      }
    }
  }
  free(v);
  }
  return status;
}
"""

MAX_ELEMENTS = 1 << 31
"""Largest draw: pair counters are 32-bit."""

_LIB: object = None
_LOCK = threading.Lock()


def _flags(openmp: bool) -> list[str]:
    # -fopenmp: the epilogue's rows run on OpenMP threads. PyTorch has loaded its own
    # libgomp.so.1 by then, so the kernel shares PyTorch's thread pool and thread count.
    # Without OpenMP support the same source builds single-threaded (-fopenmp-simd).
    flags = ["-O3", "-ffast-math", "-fopenmp" if openmp else "-fopenmp-simd", "-fPIC", "-shared"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _compile(compiler: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "native_rng.c"
        source.write_text(_SOURCE)
        built = Path(tmp) / "native_rng.so"
        subprocess.run(
            [compiler, *flags, str(source), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: concurrent builders never see half a file


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        return None
    cache = Path(os.environ.get("SEDMA_CACHE_DIR", Path.home() / ".cache" / "sedma_torch"))
    for openmp in (True, False):
        flags = _flags(openmp)
        key = hashlib.sha256((_SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
        target = cache / f"native_rng_{key}.so"
        if target.exists():
            break
        try:
            _compile(compiler, flags, target)
            break
        except subprocess.CalledProcessError:
            if not openmp:
                raise
    lib = ctypes.CDLL(str(target))
    fn = lib.sedma_normal_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32]
    fn.restype = None
    i64, f32, u32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p
    epi = lib.sedma_read_epilogue_f32
    epi.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, i64, i64, ptr, i64]  # u..cs
    epi.argtypes += [f32, f32, f32]
    epi.argtypes += [u32, u32, i64, i64, i64, i64, ptr, i64, ctypes.c_int]
    epi.restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the compiled kernel can be used (built on first call)."""
    global _LIB
    if _LIB is None:
        with _LOCK:
            if _LIB is None:
                _LIB = False
                if os.environ.get("SEDMA_NATIVE_RNG", "1") != "0":
                    try:
                        _LIB = _build() or False
                    except (OSError, subprocess.SubprocessError) as exc:
                        warnings.warn(
                            f"native RNG kernel unavailable ({exc}); using torch's generator",
                            RuntimeWarning,
                            stacklevel=2,
                        )
    return bool(_LIB)


def fill_normal_(out: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Fill a contiguous CPU float32 tensor with the stream keyed by ``(lo, hi)`` (two
    31-bit words). Raises when the kernel is unavailable; call :func:`available` first."""
    if not available():
        raise RuntimeError("native RNG kernel unavailable")
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(
            f"fill_normal_: out must be a contiguous CPU float32 tensor, got "
            f"{out.dtype} on {out.device} (contiguous={out.is_contiguous()})"
        )
    if out.numel() > MAX_ELEMENTS:
        raise ValueError(f"fill_normal_: {out.numel()} elements exceed {MAX_ELEMENTS}")
    _LIB.sedma_normal_f32(  # type: ignore[union-attr]
        out.data_ptr(), out.numel(), lo & 0x7FFFFFFF, hi & 0x7FFFFFFF
    )
    return out


def read_epilogue_(
    u: torch.Tensor,
    std: torch.Tensor | None,
    s_in: torch.Tensor,
    row0: int,
    col_scale: torch.Tensor,
    col0: int,
    out: torch.Tensor,
    *,
    group: int,
    levels: int,
    dac_levels: int,
    fixed_full: float | None,
    key: tuple[int, int],
    noise_rows: int,
    noise_row0: int,
    noise_col0: int,
    mode: int = 0,
) -> None:
    """Read noise, column ADC, de-quantisation, column scale and the sum over the input
    tiles of one block ``u`` of partial sums in DAC code units, into ``out`` (rows, width;
    a row-major view, any row stride): ``mode`` 0 writes, +1 adds, -1 subtracts.

    ``u`` is (T, rows, width) or (rows, T, width), each with unit column stride (a linear
    layer's batched matmul gives the first, a convolution's NHWC output the second).
    ``std`` and ``s_in`` are contiguous (T, ld) float32 (read-noise standard deviation and
    DAC full scale of each tile row; the block's rows start at ``row0``); ``col_scale`` is
    (T, C) with the block starting at column ``col0``. ``group`` columns share an ADC range;
    ``fixed_full`` is a fixed full scale in code units (saturating) or None (auto-range).
    The noise of (tile t, row r, column c) is keyed by ``key`` and the counter
    ``(t * noise_rows + noise_row0 + r) * C + col0 + c``, so it does not depend on how the
    read is cut into blocks. Same arithmetic as the eager path (``adc_dequantise_``) up to
    float rounding.
    """
    rows, width = out.shape
    t = col_scale.shape[0]
    if u.shape == (t, rows, width):
        t_stride, r_stride = u.stride(0), u.stride(1)
    elif u.shape == (rows, t, width):
        t_stride, r_stride = u.stride(1), u.stride(0)
    else:
        raise ValueError(f"read_epilogue_: u {tuple(u.shape)} does not match out {(rows, width)}")
    cols = col_scale.shape[1]
    if u.dtype != torch.float32 or u.stride(-1) != 1:
        raise ValueError("read_epilogue_: u must be float32 with unit column stride")
    for name, tensor in (("s_in", s_in), ("col_scale", col_scale)):
        if tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(f"read_epilogue_: {name} must be contiguous float32")
    if std is not None and (std.dtype != torch.float32 or not std.is_contiguous()):
        raise ValueError("read_epilogue_: std must be contiguous float32")
    if out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(f"read_epilogue_: out must be a ({rows}, {width}) float32 row view")
    if t * noise_rows * cols >= 2**32:
        raise ValueError("read_epilogue_: noise counters exceed 32 bits")
    if not available():
        raise RuntimeError("native kernels unavailable")
    # One thread: a second Python thread here competes with the OpenMP workers of the
    # matmuls, which spin after each call (measured slower than one thread on 2 cores).
    status = _LIB.sedma_read_epilogue_f32(  # type: ignore[union-attr]
        u.data_ptr(),
        t,
        t_stride,
        r_stride,
        rows,
        width,
        group,
        None if std is None else std.data_ptr(),
        s_in.data_ptr(),
        s_in.shape[1],
        row0,
        col_scale.data_ptr() + 4 * col0,
        cols,
        float(levels),
        float(dac_levels),
        -1.0 if fixed_full is None else float(fixed_full),
        key[0] & 0x7FFFFFFF,
        key[1] & 0x7FFFFFFF,
        noise_rows,
        noise_row0,
        cols,
        col0,
        out.data_ptr(),
        out.stride(0),
        mode,
    )
    if status != 0:
        raise MemoryError("read_epilogue_: out of memory")


__all__ = ["MAX_ELEMENTS", "available", "fill_normal_", "read_epilogue_"]
