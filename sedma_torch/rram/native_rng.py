"""Compiled CPU kernels, built once per machine from C and used through ctypes: a fast
Gaussian stream and the fused crossbar read.

**Gaussian stream.** Per-tile read noise needs one normal per tile output (T x batch x
outputs), and PyTorch's CPU generator (MT19937, serial) costs about as much as the layer's
matmul. This is a counter-based generator that the C compiler vectorises (8 lanes with
AVX2, glibc's libmvec for ``logf``/``cosf``): about 3x faster per core than
``Tensor.normal_`` here. Pair ``p`` of a draw keyed by two 31-bit words ``(lo, hi)``
hashes the counters ``2p`` and ``2p + 1`` with two rounds of a 32-bit integer hash each
(``h(h(i + lo) ^ hi)``, the bijective xorshift-multiply ``lowbias32``), takes 24-bit
uniforms ``u1`` in (0, 1) and ``u2`` in [0, 1) and returns the Box-Muller pair
``r cos(2 pi u2)`` and ``r sin(2 pi u2)``, ``r = sqrt(-2 ln u1)``, with the sine taken as
``sign * sqrt(1 - cos^2)`` (absolute error below 4e-4 near the zeros of the sine). The
first output of pair p goes to ``out[p]``, the second to ``out[n // 2 + p]``. The tests
check it against a NumPy reimplementation and for mean, variance, normality and
independence.

**Fused crossbar read** (:func:`fused_read_`, :func:`fused_conv_read_`). A simulated
crossbar read is a matmul per input tile followed by elementwise passes (read noise, ADC,
de-quantisation, column scale, tile sum) over T partial sums per output: run apart, the
passes cost more than the matmul and the partial sums T outputs of memory. Here the matmul
is a packed-panel GEMM with a 6 x 16 AVX2/FMA register block (about the speed of the BLAS
``sgemm`` behind ``nn.Linear`` on this class of CPU), and each block of partial sums goes
through the whole epilogue while it is in L1 cache. The input DAC runs while the input is
packed, and a convolution's windows are gathered there too (implicit im2col). Tests check
it against a float64 NumPy reference of the read, noise stream included.

The library is built with the system C compiler (``cc``, or ``$CC``) into
``$SEDMA_CACHE_DIR`` (default ``~/.cache/sedma_torch``) the first time it is needed
(about 1.5 s). Without a compiler, or with ``SEDMA_NATIVE_RNG=0``, callers fall back to
PyTorch (same distributions, other noise streams).
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
from dataclasses import dataclass
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* ---------------------------------------------------------------------------------------
   Fused crossbar read: GEMM with the read epilogue in its inner loop.

   The weights of each input tile t are packed once (sedma_pack_weights_f32) into strips of
   16 columns, k-major (strip s of ADC group g of tile t holds W[t, k, g*group + 16 s + j] at
   [k][j], zero padded), so a 6 x 16 register block of partial sums streams one contiguous
   strip. The rows of the input are packed per tile into blocks of 6 (k-major), converted
   to DAC code units on the way. For each block of 6 rows and each ADC group, the partial
   sums of tile t live only in a 6 x group buffer (L1) and go straight through read noise,
   ADC, de-quantisation and the column scale into the output: no partial-sum stack in
   memory, no second pass. */
#define MR 6
#define NR 16
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
static inline void kernel_6x16(const float *restrict a, const float *restrict b, int64_t K,
                               float *restrict c, int64_t ldc) {
  __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps();
  __m256 c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
  __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps();
  __m256 c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
  __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps();
  __m256 c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 b0 = _mm256_load_ps(b + NR * k), b1 = _mm256_load_ps(b + NR * k + 8);
    const float *ak = a + MR * k;
    __m256 x;
    x = _mm256_broadcast_ss(ak + 0); c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(ak + 1); c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(ak + 2); c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(ak + 3); c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
    x = _mm256_broadcast_ss(ak + 4); c40 = _mm256_fmadd_ps(x, b0, c40); c41 = _mm256_fmadd_ps(x, b1, c41);
    x = _mm256_broadcast_ss(ak + 5); c50 = _mm256_fmadd_ps(x, b0, c50); c51 = _mm256_fmadd_ps(x, b1, c51);
  }
  _mm256_store_ps(c + 0 * ldc, c00); _mm256_store_ps(c + 0 * ldc + 8, c01);
  _mm256_store_ps(c + 1 * ldc, c10); _mm256_store_ps(c + 1 * ldc + 8, c11);
  _mm256_store_ps(c + 2 * ldc, c20); _mm256_store_ps(c + 2 * ldc + 8, c21);
  _mm256_store_ps(c + 3 * ldc, c30); _mm256_store_ps(c + 3 * ldc + 8, c31);
  _mm256_store_ps(c + 4 * ldc, c40); _mm256_store_ps(c + 4 * ldc + 8, c41);
  _mm256_store_ps(c + 5 * ldc, c50); _mm256_store_ps(c + 5 * ldc + 8, c51);
}
#else
static inline void kernel_6x16(const float *restrict a, const float *restrict b, int64_t K,
                               float *restrict c, int64_t ldc) {
  float acc[MR][NR] = {{0}};
  for (int64_t k = 0; k < K; ++k)
    for (int i = 0; i < MR; ++i)
      #pragma omp simd
      for (int j = 0; j < NR; ++j) acc[i][j] += a[MR * k + i] * b[NR * k + j];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) c[i * ldc + j] = acc[i][j];
}
#endif

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

static float *alloc64(int64_t n) {  /* 64-byte aligned floats (size rounded up) */
  return (float *)aligned_alloc(64, (size_t)(ceil_div(n * 4, 64) * 64));
}

/* Packed size in floats of a (T, K, C) stack with ADC groups of `group` columns. */
int64_t sedma_packed_size(int64_t T, int64_t K, int64_t C, int64_t group) {
  int64_t full = C / group, rest = C % group;
  int64_t strips = full * ceil_div(group, NR) + ceil_div(rest, NR);
  return T * strips * K * NR;
}

void sedma_pack_weights_f32(const float *restrict w, int64_t T, int64_t K, int64_t C,
                            int64_t group, float *restrict out) {
  int64_t G = ceil_div(C, group), gs = ceil_div(group, NR);
  int64_t per_t = sedma_packed_size(1, K, C, group);
  #pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      int64_t c0 = g * group, c1 = c0 + group < C ? c0 + group : C;
      float *o = out + t * per_t + g * gs * K * NR;
      for (int64_t s = 0; s * NR < c1 - c0; ++s)
        for (int64_t k = 0; k < K; ++k) {
          const float *src = w + (t * K + k) * C + c0 + s * NR;
          float *dst = o + (s * K + k) * NR;
          for (int64_t j = 0; j < NR; ++j) dst[j] = c0 + s * NR + j < c1 ? src[j] : 0.0f;
        }
    }
}

/* Where the K inputs of row r of tile t come from: a dense (B, T, K) array (row stride
   a_stride), or, for a convolution, the kernel window of output pixel r = (n, oh, ow) in
   an NHWC image buffer (n, h, w, channel) of `channels` channels, tile t holding channels
   [t * cpt, (t + 1) * cpt) and its K = cpt * kh * kw rows ordered (channel, i, j). */
struct source {
  const float *a;
  int64_t a_stride;
  int conv;
  int64_t h, w, channels, oh, ow, cpt, kh, kw, sh, sw, dh, dw;
  int64_t rows_per_scale;  /* rows sharing one DAC range: 1, or a conv's oh * ow */
};

/* Input row r of tile t into tmp (K floats); returns a pointer to the K values. */
static inline const float *source_row(const struct source *src, int64_t r, int64_t t,
                                      int64_t K, float *tmp) {
  if (!src->conv) return src->a + r * src->a_stride + t * K;
  int64_t n = r / (src->oh * src->ow), p = r % (src->oh * src->ow);
  int64_t y0 = (p / src->ow) * src->sh, x0 = (p % src->ow) * src->sw;
  int64_t window = src->kh * src->kw;
  for (int64_t i = 0; i < src->kh; ++i)
    for (int64_t j = 0; j < src->kw; ++j) {
      const float *px = src->a + ((n * src->h + y0 + i * src->dh) * src->w + x0 + j * src->dw)
                                     * src->channels + t * src->cpt;
      float *d = tmp + i * src->kw + j;
      for (int64_t c = 0; c < src->cpt; ++c) d[c * window] = px[c];
    }
  return tmp;
}

/* One read of the crossbar for rows [0, B) of the source against packed weights wp,
   accumulated into out (B, C; row stride out_stride): mode 0 writes, +1 adds, -1
   subtracts.

   input_mode 0: the input is in DAC code units; 1: in input units, converted as
   a * (dac_levels / s_in) without rounding (an exact, unquantised input); 2: in input
   units, converted by the DAC: round(a * (dac_levels / s_in)) clipped to +-dac_levels.
   s_in is (T, ld): the DAC full scale of tile t for row r at s_in[t * ld + r /
   rows_per_scale]. noise_std > 0 adds read noise of standard deviation
   noise_std * ||a_t[r]|| (code units) to each partial sum; the noise of (t, r, c) is
   drawn per ADC group, keyed by the counter (t * noise_rows + noise_row0 + r) * C + c.
   Then the column ADC (`levels`, groups of `group` columns, fixed full scale
   fixed_full > 0 or auto-range), de-quantisation (s_in / (levels * dac_levels)), the
   column scale col_scale (T, C) and the sum over t. Returns 0, or -1 when out of memory. */
static int fused_read(const struct source *src, int64_t B, int64_t T, int64_t K, int64_t C,
                      const float *restrict wp, int64_t group, int input_mode,
                      const float *s_in, int64_t ld, float noise_std, const float *col_scale,
                      float levels, float dac_levels, float fixed_full, uint32_t lo,
                      uint32_t hi, int64_t noise_rows, int64_t noise_row0,
                      float *restrict out, int64_t out_stride, int mode) {
  int64_t G = ceil_div(C, group), gs = ceil_div(group, NR), ldc = gs * NR;
  int64_t per_t = sedma_packed_size(1, K, C, group);
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  /* row chunks (multiples of MR) so that there are at least `threads` tasks when
     possible; within a task, the weights of one group and tile are reused by all rows */
  int64_t blocks = ceil_div(B, MR);
  int64_t want = ceil_div(threads, G);
  int64_t chunk_blocks = ceil_div(blocks, want);
  if (chunk_blocks > 32) chunk_blocks = 32;
  int64_t chunks = ceil_div(blocks, chunk_blocks);
  int64_t tasks = G * chunks;
  int status = 0;
  float sign = mode < 0 ? -1.0f : 1.0f;
  int saturate = fixed_full > 0.0f;
  #pragma omp parallel if (tasks > 1 && B * K * C * T >= 262144)
  {
  float *apack = alloc64(chunk_blocks * MR * K);
  float *cbuf = alloc64(MR * ldc);
  float *noise = alloc64(ldc);
  float *tmp = alloc64(K);
  float sd[MR * 32], si[MR * 32];
  int ok = apack && cbuf && noise && tmp;
  if (!ok) {
    #pragma omp atomic write
    status = -1;
  }
  #pragma omp for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    if (!ok) continue;
    int64_t g = task / chunks, chunk = task % chunks;
    int64_t c0 = g * group, width = c0 + group < C ? group : C - c0;
    int64_t r0 = chunk * chunk_blocks * MR;
    int64_t r1 = r0 + chunk_blocks * MR < B ? r0 + chunk_blocks * MR : B;
    int64_t nb = ceil_div(r1 - r0, MR), strips = ceil_div(width, NR);
    for (int64_t t = 0; t < T; ++t) {
      /* pack this chunk's rows of tile t, k-major in blocks of MR, with their noise std */
      for (int64_t i = 0; i < nb * MR; ++i) {
        int64_t r = r0 + i;
        float *dst = apack + (i / MR) * MR * K + (i % MR);
        if (r >= r1) {
          for (int64_t k = 0; k < K; ++k) dst[MR * k] = 0.0f;
          sd[i] = 0.0f;
          continue;
        }
        const float *row = source_row(src, r, t, K, tmp);
        si[i] = s_in[t * ld + r / src->rows_per_scale];
        float mult = input_mode ? dac_levels / si[i] : 1.0f;
        float ss = 0.0f;
        if (input_mode == 2) {
          for (int64_t k = 0; k < K; ++k) {
            float v = fminf(fmaxf(rintf(row[k] * mult), -dac_levels), dac_levels);
            dst[MR * k] = v;
            ss += v * v;
          }
        } else {
          for (int64_t k = 0; k < K; ++k) {
            float v = row[k] * mult;
            dst[MR * k] = v;
            ss += v * v;
          }
        }
        sd[i] = noise_std * sqrtf(ss);
      }
      const float *wt = wp + t * per_t + g * gs * K * NR;
      const float *cs = col_scale + t * C + c0;
      int first = (t == 0) && (mode == 0);
      for (int64_t b = 0; b < nb; ++b) {
        for (int64_t s = 0; s < strips; ++s)
          kernel_6x16(apack + b * MR * K, wt + s * K * NR, K, cbuf + s * NR, ldc);
        for (int64_t i = 0; i < MR; ++i) {
          int64_t r = r0 + b * MR + i;
          if (r >= r1) break;
          float *v = cbuf + i * ldc;
          float sdev = sd[b * MR + i];
          if (sdev > 0.0f) {
            uint32_t counter = (uint32_t)((t * noise_rows + noise_row0 + r) * C + c0);
            normal_pairs(noise, width, lo, hi, counter);
            #pragma omp simd
            for (int64_t c = 0; c < width; ++c) v[c] += sdev * noise[c];
          }
          float full = fixed_full;
          if (!saturate) {
            float m = 0.0f;
            #pragma omp simd reduction(max:m)
            for (int64_t c = 0; c < width; ++c) m = fmaxf(m, fabsf(v[c]));
            full = m > 0.0f ? m : 1.0f;
          }
          float inv = levels / full;
          float scale = full * (si[b * MR + i] / (levels * dac_levels));
          float *o = out + r * out_stride + c0;
          #pragma omp simd
          for (int64_t c = 0; c < width; ++c) {
            float q = rintf(v[c] * inv);
            if (saturate) q = fminf(fmaxf(q, -levels), levels);
            float val = sign * (q * scale * cs[c]);
            o[c] = first ? val : o[c] + val;
          }
        }
      }
    }
  }
  free(apack);
  free(cbuf);
  free(noise);
  free(tmp);
  }
  return status;
}

/* fused_read of a dense (B, T, K) input (row stride a_stride; s_in (T, ld) per row). */
int sedma_fused_read_f32(const float *a, int64_t B, int64_t a_stride, int64_t T, int64_t K,
                         int64_t C, const float *wp, int64_t group, int input_mode,
                         const float *s_in, int64_t ld, float noise_std,
                         const float *col_scale, float levels, float dac_levels,
                         float fixed_full, uint32_t lo, uint32_t hi, int64_t noise_rows,
                         int64_t noise_row0, float *out, int64_t out_stride, int mode) {
  struct source src = {a, a_stride, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1};
  return fused_read(&src, B, T, K, C, wp, group, input_mode, s_in, ld, noise_std, col_scale,
                    levels, dac_levels, fixed_full, lo, hi, noise_rows, noise_row0, out,
                    out_stride, mode);
}

/* fused_read of a convolution: images (n, h, w, T * cpt) NHWC, already padded; the output
   rows are the n * oh * ow pixels (out is NHWC); s_in (T, n) holds one range per image
   and tile. geometry = {n, h, w, oh, ow, cpt, kh, kw, sh, sw, dh, dw}. */
int sedma_fused_conv_f32(const float *a, const int64_t *geometry, int64_t T, int64_t C,
                         const float *wp, int64_t group, int input_mode, const float *s_in,
                         float noise_std, const float *col_scale, float levels,
                         float dac_levels, float fixed_full, uint32_t lo, uint32_t hi,
                         int64_t noise_rows, int64_t noise_row0, float *out,
                         int64_t out_stride, int mode) {
  const int64_t *q = geometry;
  struct source src = {a, 0, 1, q[1], q[2], T * q[5], q[3], q[4], q[5], q[6], q[7],
                       q[8], q[9], q[10], q[11], q[3] * q[4]};
  int64_t K = q[5] * q[6] * q[7];
  return fused_read(&src, q[0] * q[3] * q[4], T, K, C, wp, group, input_mode, s_in, q[0],
                    noise_std, col_scale, levels, dac_levels, fixed_full, lo, hi, noise_rows,
                    noise_row0, out, out_stride, mode);
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


def _compile(compiler: str, flags: list[str], source_text: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = Path(tmp) / "kernel.c"
        source.write_text(source_text)
        built = Path(tmp) / "kernel.so"
        subprocess.run(
            [compiler, *flags, str(source), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: concurrent builders never see half a file


def build_library(name: str, source: str) -> ctypes.CDLL | None:
    """Compile C ``source`` (once per machine: the file name carries a hash of source,
    flags and compiler) into ``$SEDMA_CACHE_DIR/<name>_<hash>.so`` and load it; ``None``
    where there is no C compiler (or not Linux). Built with OpenMP when the compiler has
    it, else single-threaded (``-fopenmp-simd``). Raises ``OSError`` /
    ``subprocess.SubprocessError`` when the build fails; callers fall back to PyTorch."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        return None
    cache = Path(os.environ.get("SEDMA_CACHE_DIR", Path.home() / ".cache" / "sedma_torch"))
    for openmp in (True, False):
        flags = _flags(openmp)
        key = hashlib.sha256((source + " ".join(flags) + compiler).encode()).hexdigest()[:16]
        target = cache / f"{name}_{key}.so"
        if target.exists():
            break
        try:
            _compile(compiler, flags, source, target)
            break
        except subprocess.CalledProcessError:
            if not openmp:
                raise
    return ctypes.CDLL(str(target))


def _build() -> ctypes.CDLL | None:
    lib = build_library("native_rng", _SOURCE)
    if lib is None:
        return None
    fn = lib.sedma_normal_f32
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32]
    fn.restype = None
    i64, f32, u32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p
    lib.sedma_packed_size.argtypes = [i64, i64, i64, i64]
    lib.sedma_packed_size.restype = i64
    lib.sedma_pack_weights_f32.argtypes = [ptr, i64, i64, i64, i64, ptr]
    lib.sedma_pack_weights_f32.restype = None
    fused = lib.sedma_fused_read_f32
    fused.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, i64, ctypes.c_int, ptr, i64, f32]
    fused.argtypes += [ptr, f32, f32, f32, u32, u32, i64, i64, ptr, i64, ctypes.c_int]
    fused.restype = ctypes.c_int
    conv = lib.sedma_fused_conv_f32
    conv.argtypes = [ptr, ptr, i64, i64, ptr, i64, ctypes.c_int, ptr, f32, ptr, f32, f32, f32]
    conv.argtypes += [u32, u32, i64, i64, ptr, i64, ctypes.c_int]
    conv.restype = ctypes.c_int
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


def pack_weights(w: torch.Tensor, group: int) -> torch.Tensor:
    """The (T, K, C) float32 weight stack packed for :func:`fused_read_`: per tile and ADC
    group of ``group`` columns, strips of 16 columns stored k-major (zero padded). A 1-D
    float32 tensor of about ``w.numel()`` elements (more when ``group`` is not a multiple
    of 16)."""
    if w.device.type != "cpu" or w.dtype != torch.float32 or w.ndim != 3:
        raise ValueError(
            f"pack_weights: w must be a (T, K, C) CPU float32 tensor, got {tuple(w.shape)} "
            f"{w.dtype} on {w.device}"
        )
    if group < 1:
        raise ValueError(f"pack_weights: group must be >= 1, got {group}")
    if not available():
        raise RuntimeError("native kernels unavailable")
    w = w.contiguous()
    t, k, c = w.shape
    out = torch.empty(_LIB.sedma_packed_size(t, k, c, group), dtype=torch.float32)  # type: ignore[union-attr]
    _LIB.sedma_pack_weights_f32(w.data_ptr(), t, k, c, group, out.data_ptr())  # type: ignore[union-attr]
    return out


@dataclass(frozen=True)
class ReadSpec:
    """What one fused crossbar read does after the matmul (see :func:`fused_read_`)."""

    group: int
    """Columns sharing one ADC range (a physical column tile)."""
    input_mode: int
    """0: the input holds DAC codes; 1: the raw input, converted to code units without
    rounding (``x * (dac_levels / s_in)``: first-order correction's exact input); 2: the
    raw input, converted by the DAC (that, rounded and clipped to ``+-dac_levels``, as
    :func:`~sedma_torch.rram.crossbar.dac`), so no code tensor is ever stored."""
    noise_std: float
    """Read-noise standard deviation per unit norm of a tile's input row (code units);
    0 = no noise."""
    levels: int
    """ADC levels (``quant_levels(adc_bits)``)."""
    dac_levels: int
    """DAC levels (1 without a DAC)."""
    fixed_full: float | None
    """Fixed ADC full scale in code units (saturating), or None (each group auto-ranges)."""
    key: tuple[int, int]
    """The noise stream's key (two 31-bit words)."""
    noise_rows: int
    """Rows of the whole forward call (the noise counter's row count)."""
    noise_row0: int = 0
    """Index of this call's first row within the forward call."""
    mode: int = 0
    """0 writes the output, +1 adds to it, -1 subtracts from it."""


def _check_read(
    name: str,
    rows: int,
    t: int,
    k: int,
    s_in: torch.Tensor,
    s_in_cols: int,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: ReadSpec,
) -> list:
    """Validate the operands shared by the fused reads; the C arguments from ``packed`` on."""
    if not available():
        raise RuntimeError("native kernels unavailable")
    c = col_scale.shape[-1]
    for label, tensor, shape in (("s_in", s_in, (t, s_in_cols)), ("col_scale", col_scale, (t, c))):
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise ValueError(
                f"{name}: {label} must be float32 {shape}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError(f"{name}: {label} must be a contiguous CPU tensor")
    expected = _LIB.sedma_packed_size(t, k, c, spec.group)  # type: ignore[union-attr]
    if packed.dtype != torch.float32 or packed.numel() != expected or not packed.is_contiguous():
        raise ValueError(
            f"{name}: packed must be pack_weights of a ({t}, {k}, {c}) stack with group "
            f"{spec.group} ({expected} float32), got {packed.numel()} {packed.dtype}"
        )
    if packed.data_ptr() % 32:
        raise ValueError(f"{name}: packed must be 32-byte aligned (pack_weights' output)")
    if tuple(out.shape) != (rows, c) or out.dtype != torch.float32 or out.stride(1) != 1:
        raise ValueError(
            f"{name}: out must be a ({rows}, {c}) float32 row view, got {tuple(out.shape)} "
            f"{out.dtype} with strides {out.stride()}"
        )
    if t * spec.noise_rows * c >= 2**32:
        raise ValueError(f"{name}: noise counters exceed 32 bits")
    if spec.input_mode not in (0, 1, 2):
        raise ValueError(f"{name}: input_mode must be 0, 1 or 2, got {spec.input_mode}")
    if spec.mode not in (-1, 0, 1):
        raise ValueError(f"{name}: mode must be -1, 0 or 1, got {spec.mode}")
    return [packed.data_ptr(), spec.group, spec.input_mode, s_in.data_ptr()]


def _epilogue_args(col_scale: torch.Tensor, out: torch.Tensor, spec: ReadSpec) -> list:
    return [
        col_scale.data_ptr(),
        float(spec.levels),
        float(spec.dac_levels),
        -1.0 if spec.fixed_full is None else float(spec.fixed_full),
        spec.key[0] & 0x7FFFFFFF,
        spec.key[1] & 0x7FFFFFFF,
        spec.noise_rows,
        spec.noise_row0,
        out.data_ptr(),
        out.stride(0),
        spec.mode,
    ]


def fused_read_(
    a: torch.Tensor,
    s_in: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: ReadSpec,
) -> None:
    """One crossbar read of the rows of ``a`` (B, T, K) through the packed weights
    (:func:`pack_weights` of a (T, K, C) stack) into ``out`` (B, C): the input DAC, the
    matmul of each input tile with its read noise, column ADC, de-quantisation, column
    scale and the digital sum over the tiles, in one pass.

    ``s_in`` (T, B) is the DAC full scale of each tile row; ``col_scale`` (T, C). The
    read-noise standard deviation is ``spec.noise_std`` times the norm of the tile row
    (code units); the noise of (tile t, row r, column c) is keyed by ``spec.key`` and the
    counter ``(t * noise_rows + noise_row0 + r) * C + c``, drawn per ADC group, so it does
    not depend on how a forward call is cut into row chunks. Same arithmetic as the
    eager path (a batched matmul, then ``crossbar.adc_dequantise_``) up to float rounding.
    """
    if a.ndim != 3 or a.dtype != torch.float32 or a.device.type != "cpu" or a.stride(2) != 1:
        raise ValueError(
            f"fused_read_: a must be a (B, T, K) CPU float32 tensor with unit stride in K, "
            f"got {tuple(a.shape)} {a.dtype} on {a.device}"
        )
    b, t, k = a.shape
    if a.stride(1) != k:
        raise ValueError("fused_read_: the tiles of a row of a must be contiguous")
    args = _check_read("fused_read_", b, t, k, s_in, b, packed, col_scale, out, spec)
    status = _LIB.sedma_fused_read_f32(  # type: ignore[union-attr]
        a.data_ptr(),
        b,
        a.stride(0),
        t,
        k,
        col_scale.shape[-1],
        *args,
        b,
        float(spec.noise_std),
        *_epilogue_args(col_scale, out, spec),
    )
    if status != 0:
        raise MemoryError("fused_read_: out of memory")


def fused_conv_read_(
    images: torch.Tensor,
    s_in: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: ReadSpec,
    *,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
) -> None:
    """:func:`fused_read_` of a convolution (implicit im2col: the kernel gathers each
    output pixel's window as it packs the input, so no patch matrix is stored).

    ``images`` (N, H, W, T * cpt) is NHWC, contiguous and already padded (spatially and
    to whole tiles of ``cpt`` channels); tile t holds channels ``[t * cpt, (t + 1) * cpt)``
    and its ``K = cpt * kh * kw`` weight rows are ordered (channel, i, j). The output rows
    are the ``N * H' * W'`` output pixels: ``out`` is (N * H' * W', C), NHWC. ``s_in`` (T, N)
    holds one DAC range per image and tile.
    """
    if (
        images.ndim != 4
        or images.dtype != torch.float32
        or images.device.type != "cpu"
        or not images.is_contiguous()
    ):
        raise ValueError(
            f"fused_conv_read_: images must be a contiguous (N, H, W, C) CPU float32 tensor, "
            f"got {tuple(images.shape)} {images.dtype} on {images.device}"
        )
    n, h, w, channels = images.shape
    t = col_scale.shape[0]
    (kh, kw), (sh, sw), (dh, dw) = kernel_size, stride, dilation
    if channels % t:
        raise ValueError(f"fused_conv_read_: {channels} channels are not {t} whole tiles")
    cpt = channels // t
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(f"fused_conv_read_: images {h}x{w} are smaller than the kernel")
    rows = n * oh * ow
    args = _check_read(
        "fused_conv_read_", rows, t, cpt * kh * kw, s_in, n, packed, col_scale, out, spec
    )
    geometry = torch.tensor([n, h, w, oh, ow, cpt, kh, kw, sh, sw, dh, dw], dtype=torch.int64)
    status = _LIB.sedma_fused_conv_f32(  # type: ignore[union-attr]
        images.data_ptr(),
        geometry.data_ptr(),
        t,
        col_scale.shape[-1],
        *args,
        float(spec.noise_std),
        *_epilogue_args(col_scale, out, spec),
    )
    if status != 0:
        raise MemoryError("fused_conv_read_: out of memory")


__all__ = [
    "MAX_ELEMENTS",
    "ReadSpec",
    "available",
    "build_library",
    "fill_normal_",
    "fused_conv_read_",
    "fused_read_",
    "pack_weights",
]
