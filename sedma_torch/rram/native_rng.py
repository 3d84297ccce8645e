"""Compiled CPU kernels, built once per machine from C and used through ctypes: a fast
Gaussian stream and the fused crossbar read.

**Gaussian stream.** Per-tile read noise needs one normal per tile output (T x batch x
outputs), and PyTorch's CPU generator (MT19937, serial) costs about as much as the layer's
matmul. This is a counter-based generator that the C compiler vectorises (8 lanes with
AVX2, glibc's libmvec for ``logf``/``cosf``): about 3x faster per core than
``Tensor.normal_`` here. Pair ``p`` of a draw keyed by two 31-bit words ``(lo, hi)``
hashes the 64-bit counters ``2p`` and ``2p + 1`` with two rounds of a 32-bit integer hash
each, ``h(h(i_lo + lo) ^ hi ^ h(i_hi))`` for the low and high 32 bits ``i_lo``, ``i_hi``
of counter ``i`` (``h``: the bijective xorshift-multiply ``lowbias32``; ``h(0) = 0``, so
below ``2^32`` this is ``h(h(i + lo) ^ hi)``; each 2^32 counters further on, ``h(i_hi)``
changes the key word, so the stream never repeats: counters ``i`` and ``i + 2^32 k`` never
share a hash), takes 24-bit uniforms ``u1`` in (0, 1) and ``u2`` in [0, 1) and returns the
Box-Muller pair
``r cos(2 pi u2)`` and ``r sin(2 pi u2)``, ``r = sqrt(-2 ln u1)``, with the sine taken as
``sign * sqrt(1 - cos^2)`` (absolute error below 4e-4 near the zeros of the sine). The
first output of pair p goes to ``out[p]``, the second to ``out[n // 2 + p]``
(:func:`fill_normal_`'s ``offset`` starts at pair ``offset`` instead of 0). The tests
check it against a NumPy reimplementation and for mean, variance, normality and
independence.

**Fused crossbar read** (:func:`fused_read_`, :func:`fused_conv_read_`). A simulated
crossbar read is a matmul per input tile followed by elementwise passes (read noise, ADC,
de-quantisation, column scale, tile sum) over T partial sums per output: run apart, the
passes cost more than the matmul and the partial sums T outputs of memory. Here the matmul
is a packed-panel GEMM with a 6 x 16 AVX2/FMA register block, or 6 x 32 (two strips) on
AVX-512 CPUs (built with ``-mavx512f`` there unless ``SEDMA_NATIVE_AVX512=0``; about the
speed of the BLAS ``sgemm`` behind ``nn.Linear``), and each block of partial sums goes
through the whole epilogue while it is in L1 cache. The input DAC runs while the input is
packed, and a convolution's windows are gathered there too (implicit im2col). Tests check
it against a float64 NumPy reference of the read, noise stream included.

The library is built with the system C compiler (``cc``, or ``$CC``) into
``$SEDMA_CACHE_DIR`` (default ``~/.cache/sedma_torch``) the first time it is needed
(about 1.5 s). Without a compiler, or with ``SEDMA_NATIVE_RNG=0``, callers fall back to
PyTorch (same distributions, other noise streams).

**Operand checks.** The C code trusts its arguments, so every wrapper that hands it
pointers (:func:`fill_normal_`, :func:`pack_weights`, :func:`tile_absmax`,
:func:`fused_read_`, :func:`fused_conv_read_`, and those of
:mod:`~sedma_torch.rram.native_depthwise` and :mod:`~sedma_torch.rram.native_program`)
first checks everything it is given -- dtype, CPU, contiguity and strides, shapes
consistent with each other, kernel size / stride / dilation / tile sizes >= 1, output
sizes that follow from the input's, sizes, index products and noise counters below
:data:`INDEX_LIMIT` -- and raises ``ValueError`` naming the operand. Reads of no rows return
at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import numbers
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

C_INLINE = r"""
/* lowbias32: bijective xorshift-multiply hash on 32 bits */
static inline uint32_t h32(uint32_t x) {
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x846CA68Bu; x ^= x >> 16;
  return x;
}

/* The key word of the 64-bit counters i with high half i >> 32 = j: hi ^ h32(j). A counter
   i hashes as h32(h32((uint32_t)i + lo) ^ key_hi(hi, i)): a bijection of the low half for
   each j, and i, i + 2^32 k (k != 0) never share a hash (h32 is a bijection); since
   h32(0) = 0, the counters below 2^32 hash as the 32-bit stream h32(h32(i + lo) ^ hi). */
static inline uint32_t key_hi(uint32_t hi, uint64_t i) {
  return hi ^ h32((uint32_t)(i >> 32));
}

/* Normal pairs from pair q on whose counters 2q, 2q + 1 share their high 32 bits (one
   key_hi): the pairs up to the next multiple of 2^31. */
static inline int64_t pairs_in_run(uint64_t q) {
  return (int64_t)((((q >> 31) + 1) << 31) - q);
}

/* Inline float32 log, log1p, expm1 and cos/sin(2 pi u), accurate to a few ulp: a loop with
   no calls stays in vector registers (libmvec calls spill them). They avoid expressions
   -ffast-math could reassociate into a cancellation. */
static const float LN2_HI = 0.693145751953125f, LN2_LO = 1.428606765330187e-06f;

/* log(u) from the reduced z = (m - 1) / (m + 1), u = 2^k m, m in [sqrt(1/2), sqrt(2)):
   log u = k ln 2 + 2 atanh(z), |z| <= 0.1716 (series to z^11) */
static inline float log_from(float z, float k) {
  float w = z * z;
  float s = w * (1.0f / 3 + w * (1.0f / 5 + w * (1.0f / 7 + w * (1.0f / 9 + w * (1.0f / 11)))));
  float z2 = z + z;
  return k * LN2_HI + (k * LN2_LO + (z2 + z2 * s));
}

static inline int32_t log_exponent(float u, float *m) {
  union { float f; int32_t i; } v = {u};
  int32_t k = (v.i - 0x3F3504F3) >> 23; /* 0x3F3504F3: sqrt(1/2) */
  v.i -= k * (1 << 23);
  *m = v.f;
  return k;
}

/* log(1 + x), x > -1: around x = 0 (k = 0) z = x / (2 + x) keeps x's full precision */
static inline float ln1p(float x) {
  float m;
  int32_t k = log_exponent(1.0f + x, &m);
  float num = k == 0 ? x : m - 1.0f, den = k == 0 ? 2.0f + x : m + 1.0f;
  return log_from(num / den, (float)k);
}

/* log(u), u > 0 normal */
static inline float ln(float u) {
  float m;
  int32_t k = log_exponent(u, &m);
  return log_from((m - 1.0f) / (m + 1.0f), (float)k);
}

/* e^y - 1: y = k ln 2 + r, |r| <= ln 2 / 2, Taylor series of e^r - 1 to r^8;
   k = 0 returns the series itself (no 1 + ... - 1 cancellation) */
static inline float em1(float y) {
  y = fminf(fmaxf(y, -80.0f), 80.0f);
  float kf = rintf(y * 1.4426950408889634f);
  float r = (y - kf * LN2_HI) - kf * LN2_LO;
  float p = r * (1.0f + r * (1.0f / 2 + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120
            + r * (1.0f / 720 + r * (1.0f / 5040 + r * (1.0f / 40320))))))));
  union { float f; int32_t i; } scale = {0.0f};
  scale.i = ((int32_t)kf + 127) << 23;
  return kf == 0.0f ? p : scale.f * p + (scale.f - 1.0f);
}

/* cos and sin of 2 pi u for u in [0, 1): quarter turns q = rint(4u), a = (4u - q) pi / 2
   (exact reduction), Taylor series of cos and sin on [-pi/4, pi/4] */
static inline void sincos_turn(float u, float *cosv, float *sinv) {
  float u4 = 4.0f * u, q = rintf(u4);
  float a = (u4 - q) * 1.5707963267948966f, a2 = a * a;
  float c = 1.0f - a2 * (1.0f / 2 - a2 * (1.0f / 24 - a2 * (1.0f / 720 - a2 * (1.0f / 40320))));
  float s = a * (1.0f - a2 * (1.0f / 6 - a2 * (1.0f / 120 - a2 * (1.0f / 5040
            - a2 * (1.0f / 362880)))));
  int32_t quadrant = (int32_t)q & 3;
  float cq = (quadrant & 1) ? s : c, sq = (quadrant & 1) ? c : s;
  *cosv = (quadrant == 1 || quadrant == 2) ? -cq : cq;
  *sinv = (quadrant >= 2) ? -sq : sq;
}

static inline float cos_turn(float u) {
  float c, s;
  sincos_turn(u, &c, &s);
  return c;
}
"""
"""C helpers shared by the compiled kernels (sedma_torch.rram.native_*): the ``lowbias32``
hash and inline float32 ``ln``, ``ln1p``, ``em1``, ``sincos_turn`` / ``cos_turn``."""

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

%INLINE%
/* n normals: pair p (pair counter P = offset + p, 64-bit; it hashes the counters 2P and
   2P + 1) -> out[p] (cosine) and out[n/2 + p] (sine). The pairs go in runs that share the
   high 32 bits of their counters (2^31 pairs), so the vector loop is 32-bit. */
static void normal_pairs(float *restrict out, int64_t n, uint32_t lo, uint32_t hi,
                         uint64_t offset) {
  int64_t npairs = n / 2;
  for (int64_t p0 = 0; p0 < npairs;) {
    uint64_t first = offset + (uint64_t)p0;
    int64_t run = pairs_in_run(first);
    int64_t p1 = npairs - p0 <= run ? npairs : p0 + run;
    uint32_t khi = key_hi(hi, 2 * first), base = 2u * (uint32_t)first;
    #pragma omp simd
    for (int64_t p = p0; p < p1; ++p) {
      uint32_t i2 = base + 2u * (uint32_t)(p - p0);
      uint32_t a = h32(h32(i2 + lo) ^ khi), b = h32(h32(i2 + 1u + lo) ^ khi);
      float u1 = ((float)(int32_t)(a >> 8) + 0.5f) * (1.0f / 16777216.0f);
      float u2 = (float)(int32_t)(b >> 8) * (1.0f / 16777216.0f);
      float r = sqrtf(-2.0f * logf(u1));
      float c = cosf(6.283185307179586f * u2);
      float s = sqrtf(fmaxf(1.0f - c * c, 0.0f));
      out[p] = r * c;
      out[npairs + p] = (u2 < 0.5f ? r : -r) * s;
    }
    p0 = p1;
  }
  if (n % 2) {  /* odd n: the cosine of pair npairs */
    uint64_t pair = offset + (uint64_t)npairs;
    uint32_t i2 = 2u * (uint32_t)pair, khi = key_hi(hi, 2 * pair);
    uint32_t a = h32(h32(i2 + lo) ^ khi), b = h32(h32(i2 + 1u + lo) ^ khi);
    float u1 = ((float)(int32_t)(a >> 8) + 0.5f) * (1.0f / 16777216.0f);
    float u2 = (float)(int32_t)(b >> 8) * (1.0f / 16777216.0f);
    out[n - 1] = sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
  }
}

/* The caller (fill_normal_) checks n >= 0 and offset + n / 2 + 1 <= 2^62. */
void sedma_normal_f32(float *restrict out, int64_t n, uint32_t lo, uint32_t hi,
                      uint64_t offset) {
  if (n <= 0) return;
  normal_pairs(out, n, lo, hi, offset);
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
#if defined(__AVX512F__)
/* AVX-512: two adjacent 16-column strips (b0, b1) at once, one zmm register per row and
   strip: 12 accumulators, 2 loads and 6 broadcasts per k (FMA-bound, twice the AVX2
   block's work per instruction). Same packing as the AVX2 block. */
#define SEDMA_KERNEL_6X32 1
static inline void kernel_6x32(const float *restrict a, const float *restrict b0,
                               const float *restrict b1, int64_t K, float *restrict c,
                               int64_t ldc) {
  __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
  __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
  __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
  __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
  __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
  __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 w0 = _mm512_loadu_ps(b0 + NR * k), w1 = _mm512_loadu_ps(b1 + NR * k);
    const float *ak = a + MR * k;
    __m512 x;
    x = _mm512_set1_ps(ak[0]); c00 = _mm512_fmadd_ps(x, w0, c00); c01 = _mm512_fmadd_ps(x, w1, c01);
    x = _mm512_set1_ps(ak[1]); c10 = _mm512_fmadd_ps(x, w0, c10); c11 = _mm512_fmadd_ps(x, w1, c11);
    x = _mm512_set1_ps(ak[2]); c20 = _mm512_fmadd_ps(x, w0, c20); c21 = _mm512_fmadd_ps(x, w1, c21);
    x = _mm512_set1_ps(ak[3]); c30 = _mm512_fmadd_ps(x, w0, c30); c31 = _mm512_fmadd_ps(x, w1, c31);
    x = _mm512_set1_ps(ak[4]); c40 = _mm512_fmadd_ps(x, w0, c40); c41 = _mm512_fmadd_ps(x, w1, c41);
    x = _mm512_set1_ps(ak[5]); c50 = _mm512_fmadd_ps(x, w0, c50); c51 = _mm512_fmadd_ps(x, w1, c51);
  }
  _mm512_storeu_ps(c + 0 * ldc, c00); _mm512_storeu_ps(c + 0 * ldc + NR, c01);
  _mm512_storeu_ps(c + 1 * ldc, c10); _mm512_storeu_ps(c + 1 * ldc + NR, c11);
  _mm512_storeu_ps(c + 2 * ldc, c20); _mm512_storeu_ps(c + 2 * ldc + NR, c21);
  _mm512_storeu_ps(c + 3 * ldc, c30); _mm512_storeu_ps(c + 3 * ldc + NR, c31);
  _mm512_storeu_ps(c + 4 * ldc, c40); _mm512_storeu_ps(c + 4 * ldc + NR, c41);
  _mm512_storeu_ps(c + 5 * ldc, c50); _mm512_storeu_ps(c + 5 * ldc + NR, c51);
}
#endif
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
  if (T < 0 || K < 0 || C < 0 || group < 1) return -1;
  int64_t full = C / group, rest = C % group;
  int64_t strips = full * ceil_div(group, NR) + ceil_div(rest, NR);
  return T * strips * K * NR;
}

void sedma_pack_weights_f32(const float *restrict w, int64_t T, int64_t K, int64_t C,
                            int64_t group, float *restrict out) {
  /* the caller (pack_weights) checks the sizes and passes group <= max(C, 1) */
  if (T <= 0 || K <= 0 || C <= 0 || group < 1) return;
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

/* The input of a read: NCHW images x (n, c_in, h, w), already padded spatially, read
   through kh x kw windows (stride, dilation) at oh x ow output pixels. Row r of the read is
   output pixel (image r / (oh ow), pixel r % (oh ow)); tile t holds channels
   [t cpt, (t + 1) cpt) (channels >= c_in are zero: padding to whole tiles) and its K =
   cpt kh kw inputs are ordered (channel, i, j). A linear layer's (n, c_in) rows are the
   case h = w = kh = kw = 1. */
struct source {
  const float *x;
  int64_t n, c_in, h, w, oh, ow, cpt, kh, kw, sh, sw, dh, dw;
};

static inline float dac_convert(float v, float mult, int quantise, float dac_levels) {
  float c = v * mult;
  return quantise ? fminf(fmaxf(rintf(c), -dac_levels), dac_levels) : c;
}

/* Pack rows [r0, r0 + valid) of tile t (valid <= MR; missing rows are zero) into dst, k-major
   (dst[k MR + m]), converted to DAC code units with each row's multiplier, and add each
   row's sum of squares (code units) to ss. */
static void pack_block(const struct source *s, int64_t r0, int64_t valid, int64_t t, int64_t K,
                       const float *mult, int quantise, float dac_levels, float *restrict dst,
                       float *restrict ss) {
  int64_t pix = s->oh * s->ow, window = s->kh * s->kw, c_first = t * s->cpt;
  int64_t c_valid = s->c_in - c_first < s->cpt ? s->c_in - c_first : s->cpt;
  for (int64_t k = 0; k < K * MR; ++k) dst[k] = 0.0f;
  if (s->h == 1 && s->w == 1 && window == 1) {  /* dense rows */
    for (int64_t m = 0; m < valid; ++m) {
      const float *row = s->x + (r0 + m) * s->c_in + c_first;
      float acc = 0.0f;
      for (int64_t k = 0; k < c_valid; ++k) {
        float v = dac_convert(row[k], mult[m], quantise, dac_levels);
        dst[k * MR + m] = v;
        acc += v * v;
      }
      ss[m] += acc;
    }
    return;
  }
  int64_t n0 = r0 / pix, p0 = r0 % pix, oy0 = p0 / s->ow, ox0 = p0 % s->ow;
  if (valid == MR && ox0 + MR <= s->ow && s->sw == 1) {
    /* six neighbours on one output row: each input is a run of six floats */
    float acc[MR] = {0};
    for (int64_t c = 0; c < c_valid; ++c)
      for (int64_t i = 0; i < s->kh; ++i) {
        const float *line = s->x + ((n0 * s->c_in + c_first + c) * s->h + oy0 * s->sh
                                    + i * s->dh) * s->w + ox0;
        for (int64_t j = 0; j < s->kw; ++j) {
          const float *px = line + j * s->dw;
          float *d = dst + (c * window + i * s->kw + j) * MR;
          for (int m = 0; m < MR; ++m) {
            float v = dac_convert(px[m], mult[0], quantise, dac_levels);
            d[m] = v;
            acc[m] += v * v;
          }
        }
      }
    for (int m = 0; m < MR; ++m) ss[m] += acc[m];
    return;
  }
  for (int64_t m = 0; m < valid; ++m) {
    int64_t r = r0 + m, n = r / pix, p = r % pix, oy = p / s->ow, ox = p % s->ow;
    float acc = 0.0f;
    for (int64_t c = 0; c < c_valid; ++c)
      for (int64_t i = 0; i < s->kh; ++i)
        for (int64_t j = 0; j < s->kw; ++j) {
          float v = s->x[((n * s->c_in + c_first + c) * s->h + oy * s->sh + i * s->dh) * s->w
                         + ox * s->sw + j * s->dw];
          v = dac_convert(v, mult[m], quantise, dac_levels);
          dst[(c * window + i * s->kw + j) * MR + m] = v;
          acc += v * v;
        }
    ss[m] += acc;
  }
}

/* One read of the crossbar for all rows (output pixels) of the source against packed
   weights wp, accumulated into out (rows, C; row stride out_stride): mode 0 writes, +1
   adds, -1 subtracts.

   The DAC converts input v of image n and tile t to code units as v * (dac_levels /
   s_in[t, n]), rounded and clipped to +-dac_levels when `quantise` (else exact: first-order
   correction's full-precision input). s_in is (T, n). Read noise is added to each partial
   sum with variance noise_std^2 ||codes of the row's tile input||^2 (state-independent
   cells) plus, when vp is not NULL, sum_k codes_k^2 V[t, k, c] (a state-dependent
   variance per weight V, packed as the weights: one more product, codes^2 @ V); the
   noise of (t, r, c) is drawn per ADC group, keyed by the 64-bit pair counter counter0 +
   (t * rows + r) * C + c (rows: the read's n * oh * ow rows). Then the column ADC
   (`levels`, groups of `group` columns, fixed full scale fixed_full > 0 or auto-range),
   de-quantisation (s_in / (levels * dac_levels)), the column scale col_scale (T, C) and the
   sum over t.
   geometry = {n, c_in, h, w, oh, ow, cpt, kh, kw, sh, sw, dh, dw} (struct source).
   The caller (native_rng._read) validates all operands: shapes, strides, index products
   below 2^62, 1 <= group <= C; the checks here only stop a call that bypasses it from
   reading outside x. Returns 0, -1 when out of memory, -2 for an invalid geometry. */
int sedma_fused_read_f32(const float *x, const int64_t *geometry, int64_t T, int64_t C,
                         const float *restrict wp, const float *restrict vp, int64_t group,
                         int quantise,
                         const float *s_in, float noise_std, const float *col_scale,
                         float levels, float dac_levels, float fixed_full, uint32_t lo,
                         uint32_t hi, float *restrict out, int64_t out_stride, int mode,
                         int64_t counter0) {
  const int64_t *q = geometry;
  struct source src = {x, q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8], q[9],
                       q[10], q[11], q[12]};
  for (int i = 0; i < 13; ++i)
    if (q[i] < (i < 6 ? 0 : 1)) return -2;
  if (T < 1 || C < 0 || group < 1 || counter0 < 0 || src.c_in < 1
      || (T - 1) * src.cpt >= src.c_in || T * src.cpt < src.c_in
      || src.h - src.dh * (src.kh - 1) - 1 < 0 || src.w - src.dw * (src.kw - 1) - 1 < 0
      || src.oh != (src.h - src.dh * (src.kh - 1) - 1) / src.sh + 1
      || src.ow != (src.w - src.dw * (src.kw - 1) - 1) / src.sw + 1)
    return -2;
  if (src.n == 0 || C == 0) return 0;
  int64_t pix = src.oh * src.ow, B = src.n * pix, K = src.cpt * src.kh * src.kw;
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
  float *vbuf = vp ? alloc64(MR * ldc) : NULL;
  float *apack2 = vp ? alloc64(chunk_blocks * MR * K) : NULL;
  float *noise = alloc64(ldc);
  float sd[MR * 32], si[MR * 32];
  int ok = apack && cbuf && noise && (!vp || (vbuf && apack2));
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
      for (int64_t b = 0; b < nb; ++b) {
        int64_t rb = r0 + b * MR, valid = r1 - rb < MR ? r1 - rb : MR;
        float mult[MR], ss[MR] = {0};
        for (int64_t m = 0; m < MR; ++m) {
          si[b * MR + m] = m < valid ? s_in[t * src.n + (rb + m) / pix] : 1.0f;
          mult[m] = dac_levels / si[b * MR + m];
        }
        pack_block(&src, rb, valid, t, K, mult, quantise, dac_levels, apack + b * MR * K, ss);
        for (int64_t m = 0; m < MR; ++m) sd[b * MR + m] = noise_std * sqrtf(ss[m]);
      }
      if (vp) {  /* squared codes for the variance product */
        const float *a = apack;
        #pragma omp simd
        for (int64_t k = 0; k < nb * MR * K; ++k) apack2[k] = a[k] * a[k];
      }
      const float *vt = vp ? vp + t * per_t + g * gs * K * NR : NULL;
      const float *wt = wp + t * per_t + g * gs * K * NR;
      const float *cs = col_scale + t * C + c0;
      int first = (t == 0) && (mode == 0);
      for (int64_t b = 0; b < nb; ++b) {
        int64_t s = 0;
#ifdef SEDMA_KERNEL_6X32
        for (; s + 1 < strips; s += 2)
          kernel_6x32(apack + b * MR * K, wt + s * K * NR, wt + (s + 1) * K * NR, K,
                      cbuf + s * NR, ldc);
#endif
        for (; s < strips; ++s)
          kernel_6x16(apack + b * MR * K, wt + s * K * NR, K, cbuf + s * NR, ldc);
        if (vt) {
          s = 0;
#ifdef SEDMA_KERNEL_6X32
          for (; s + 1 < strips; s += 2)
            kernel_6x32(apack2 + b * MR * K, vt + s * K * NR, vt + (s + 1) * K * NR, K,
                        vbuf + s * NR, ldc);
#endif
          for (; s < strips; ++s)
            kernel_6x16(apack2 + b * MR * K, vt + s * K * NR, K, vbuf + s * NR, ldc);
        }
        for (int64_t i = 0; i < MR; ++i) {
          int64_t r = r0 + b * MR + i;
          if (r >= r1) break;
          float *v = cbuf + i * ldc;
          float sdev = sd[b * MR + i];
          if (vt) {
            const float *var = vbuf + i * ldc;
            float s2 = sdev * sdev;
            normal_pairs(noise, width, lo, hi, (uint64_t)(counter0 + (t * B + r) * C + c0));
            #pragma omp simd
            for (int64_t c = 0; c < width; ++c)
              v[c] += sqrtf(fmaxf(s2 + var[c], 0.0f)) * noise[c];
          } else if (sdev > 0.0f) {
            normal_pairs(noise, width, lo, hi, (uint64_t)(counter0 + (t * B + r) * C + c0));
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
            float qv = rintf(v[c] * inv);
            if (saturate) qv = fminf(fmaxf(qv, -levels), levels);
            float val = sign * (qv * scale * cs[c]);
            o[c] = first ? val : o[c] + val;
          }
        }
      }
    }
  }
  free(apack);
  free(cbuf);
  free(vbuf);
  free(apack2);
  free(noise);
  }
  return status;
}

/* DAC ranges: out[t * n + i] = max |x| over the channels [t cpt, (t + 1) cpt) (those below
   c_in) of image i of NCHW x (n, c_in, hw), or 1 where that is 0 (an all-zero input). */
void sedma_tile_absmax_f32(const float *x, int64_t n, int64_t c_in, int64_t hw, int64_t cpt,
                           int64_t T, float *out) {
  /* the caller (tile_absmax) checks that the T tiles of cpt channels cover c_in */
  if (n <= 0 || c_in <= 0 || hw < 0 || cpt < 1 || T < 1 || (T - 1) * cpt >= c_in) return;
  #pragma omp parallel for collapse(2) schedule(static) if (n * c_in * hw >= 65536)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t t = 0; t < T; ++t) {
      int64_t c1 = (t + 1) * cpt < c_in ? (t + 1) * cpt : c_in;
      const float *p = x + (i * c_in + t * cpt) * hw;
      int64_t len = (c1 - t * cpt) * hw;
      float m = 0.0f;
      #pragma omp simd reduction(max:m)
      for (int64_t k = 0; k < len; ++k) m = fmaxf(m, fabsf(p[k]));
      out[t * n + i] = m > 0.0f ? m : 1.0f;
    }
}
"""
_SOURCE = _SOURCE.replace("%INLINE%", C_INLINE)

INDEX_LIMIT = 1 << 62
"""Bound on every size, index product and noise counter handed to the compiled kernels:
they compute in int64 (counters in uint64), with room for a sum of two such values."""

MAX_ELEMENTS = INDEX_LIMIT
"""Largest draw (and largest first pair counter plus pairs): the counters are 64-bit."""


def _flags(openmp: bool) -> list[str]:
    # -fopenmp: the kernels run on OpenMP threads. PyTorch has loaded its own
    # libgomp.so.1 by then, so the kernel shares PyTorch's thread pool and thread count.
    # Without OpenMP support the same source builds single-threaded (-fopenmp-simd).
    flags = ["-O3", "-ffast-math", "-fopenmp" if openmp else "-fopenmp-simd", "-fPIC", "-shared"]
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512" and os.environ.get("SEDMA_NATIVE_AVX512", "1") != "0":
        flags += ["-mavx512f"]
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


def _declare(lib: ctypes.CDLL) -> None:
    i64, f32, u32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_uint32, ctypes.c_void_p
    fn = lib.sedma_normal_f32
    fn.argtypes = [ptr, i64, u32, u32, ctypes.c_uint64]
    fn.restype = None
    lib.sedma_packed_size.argtypes = [i64, i64, i64, i64]
    lib.sedma_packed_size.restype = i64
    lib.sedma_pack_weights_f32.argtypes = [ptr, i64, i64, i64, i64, ptr]
    lib.sedma_pack_weights_f32.restype = None
    fused = lib.sedma_fused_read_f32
    fused.argtypes = [ptr, ptr, i64, i64, ptr, ptr, i64, ctypes.c_int, ptr, f32, ptr, f32, f32]
    fused.argtypes += [f32]
    fused.argtypes += [u32, u32, ptr, i64, ctypes.c_int, i64]
    fused.restype = ctypes.c_int
    lib.sedma_tile_absmax_f32.argtypes = [ptr, i64, i64, i64, i64, i64, ptr]
    lib.sedma_tile_absmax_f32.restype = None


class LazyLibrary:
    """A C library built (:func:`build_library`) and loaded on first use, thread-safe.

    ``declare`` sets the ctypes signatures. ``get()`` returns the library, or None with
    ``SEDMA_NATIVE_RNG=0``, without a C compiler, or when the build failed (which warns
    once, naming ``what``); callers then take their PyTorch path."""

    def __init__(self, name: str, source: str, declare, what: str) -> None:
        self.name, self.source, self.declare, self.what = name, source, declare, what
        self._lib: ctypes.CDLL | bool | None = None
        self._lock = threading.Lock()

    def get(self) -> ctypes.CDLL | None:
        if self._lib is None:
            with self._lock:
                if self._lib is None:
                    self._lib = self._load()
        return self._lib or None  # type: ignore[return-value]

    def _load(self) -> ctypes.CDLL | bool:
        if os.environ.get("SEDMA_NATIVE_RNG", "1") == "0":
            return False
        try:
            lib = build_library(self.name, self.source)
        except (OSError, subprocess.SubprocessError) as exc:
            warnings.warn(
                f"{self.what} unavailable ({exc}); using PyTorch", RuntimeWarning, stacklevel=4
            )
            return False
        if lib is None:
            return False
        self.declare(lib)
        return lib


_KERNELS = LazyLibrary("native_rng", _SOURCE, _declare, "native kernels")


def available() -> bool:
    """True when the compiled kernels can be used (built on the first call)."""
    return _KERNELS.get() is not None


def _lib() -> ctypes.CDLL:
    lib = _KERNELS.get()
    if lib is None:
        raise RuntimeError("native kernels unavailable; call available() first")
    return lib


# ----- validation of the operands handed to the compiled kernels ----------------------------
# Every public wrapper that passes pointers to C checks here, before anything is read or
# written, all that the C code assumes: dtypes, CPU, contiguity / strides, consistent
# shapes, geometry >= 1 and the sizes it implies, and index products below INDEX_LIMIT.


def check_int(func: str, name: str, value, minimum: int = 0, maximum: int = INDEX_LIMIT) -> int:
    """``value`` as an int in [minimum, maximum], else ``ValueError`` naming ``name``."""
    if type(value) is int and minimum <= value <= maximum:  # the common case, quickly
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{func}: {name} must be an int, got {value!r}")
    value = int(value)
    if not minimum <= value <= maximum:
        raise ValueError(f"{func}: {name} must be an int in [{minimum}, {maximum}], got {value}")
    return value


def check_pair(func: str, name: str, value) -> tuple[int, int]:
    """An int or a pair of ints, each >= 1 (and <= INDEX_LIMIT), as a pair."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and 1 <= v <= INDEX_LIMIT
        for v in pair
    ):
        raise ValueError(f"{func}: {name} must be two ints >= 1 (and <= 2^62), got {value!r}")
    return int(pair[0]), int(pair[1])


def check_tensor(
    func: str,
    name: str,
    tensor,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    *,
    contiguous: bool = True,
) -> None:
    """A CPU tensor of ``dtype`` (and ``shape``; contiguous unless told), else
    ``ValueError`` naming ``name``."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{func}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype or tensor.device.type != "cpu":
        raise ValueError(
            f"{func}: {name} must be a CPU {str(dtype).removeprefix('torch.')} tensor, got "
            f"{tensor.dtype} on {tensor.device}"
        )
    if shape is not None and tuple(tensor.shape) != tuple(shape):
        raise ValueError(
            f"{func}: {name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}"
        )
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{func}: {name} must be contiguous, got strides {tensor.stride()}")


def check_products(func: str, what: str, *factors: int) -> None:
    """The product of ``factors`` must stay below INDEX_LIMIT (int64 in the C code)."""
    if math.prod(factors) > INDEX_LIMIT:
        raise ValueError(f"{func}: {what} ({' x '.join(map(str, factors))}) exceeds 2^62")


def _extent(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes [start, end) a (non-empty) tensor view spans."""
    start = tensor.data_ptr()
    if tensor.is_contiguous():
        return start, start + tensor.numel() * tensor.element_size()
    span = sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )
    return start, start + (span + 1) * tensor.element_size()


def check_no_overlap(func: str, out_name: str, out: torch.Tensor, **inputs) -> None:
    """``out`` (written by the kernel while it reads ``inputs``) shares no memory with them."""
    if out.numel() == 0:
        return
    o0, o1 = _extent(out)
    for name, tensor in inputs.items():
        if tensor is None or tensor.numel() == 0:
            continue
        i0, i1 = _extent(tensor)
        if i0 < o1 and o0 < i1:
            raise ValueError(f"{func}: {out_name} must not share memory with {name}")


def _check_real(func: str, name: str, value, minimum: float, *, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{func}: {name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < minimum or (strict and value <= minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{func}: {name} must be finite and {bound}, got {value}")
    return value


def check_spec(func: str, spec) -> None:
    """The fields of a :class:`ReadSpec` that the compiled reads use."""
    if not isinstance(spec, ReadSpec):
        raise ValueError(f"{func}: spec must be a native_rng.ReadSpec, got {type(spec).__name__}")
    check_int(func, "spec.group", spec.group, 1)
    if not isinstance(spec.quantise, (bool, int)):
        raise ValueError(f"{func}: spec.quantise must be a bool, got {spec.quantise!r}")
    _check_real(func, "spec.noise_std", spec.noise_std, 0.0)
    _check_real(func, "spec.levels", spec.levels, 1.0)
    _check_real(func, "spec.dac_levels", spec.dac_levels, 1.0)
    if spec.fixed_full is not None:
        _check_real(func, "spec.fixed_full", spec.fixed_full, 0.0, strict=True)
    key = spec.key
    if not (
        isinstance(key, (tuple, list))
        and len(key) == 2
        and all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in key)
    ):
        raise ValueError(f"{func}: spec.key must be two ints, got {key!r}")
    if isinstance(spec.mode, bool) or spec.mode not in (-1, 0, 1):
        raise ValueError(f"{func}: spec.mode must be -1, 0 or 1, got {spec.mode!r}")


def packed_size(t: int, k: int, c: int, group: int) -> int:
    """Floats of :func:`pack_weights` of a (t, k, c) stack with ADC groups of ``group``."""
    full, rest = divmod(c, group)
    strips = full * -(-group // 16) + -(-rest // 16)
    return t * strips * k * 16


# ----- the wrappers ---------------------------------------------------------------------------
def fill_normal_(out: torch.Tensor, lo: int, hi: int, *, offset: int = 0) -> torch.Tensor:
    """Fill a contiguous CPU float32 tensor with the stream keyed by ``(lo, hi)`` (two
    31-bit words): with ``n = out.numel()``, ``out[p]`` is the cosine and ``out[n // 2 + p]``
    the sine of pair ``offset + p`` (64-bit pair counters; ``offset`` 0 for a whole draw,
    larger to read the stream further on). Raises when the kernel is unavailable; call
    :func:`available` first."""
    check_tensor("fill_normal_", "out", out)
    lo = check_int("fill_normal_", "lo", lo, -(1 << 63), 1 << 63)
    hi = check_int("fill_normal_", "hi", hi, -(1 << 63), 1 << 63)
    n = out.numel()
    if n > MAX_ELEMENTS:
        raise ValueError(f"fill_normal_: out has {n} elements, more than {MAX_ELEMENTS}")
    offset = check_int("fill_normal_", "offset", offset, 0, INDEX_LIMIT - n // 2 - 1)
    if not available():
        raise RuntimeError("native RNG kernel unavailable")
    if n:
        _lib().sedma_normal_f32(out.data_ptr(), n, lo & 0x7FFFFFFF, hi & 0x7FFFFFFF, offset)
    return out


def pack_weights(w: torch.Tensor, group: int) -> torch.Tensor:
    """The (T, K, C) float32 weight stack packed for :func:`fused_read_`: per tile and ADC
    group of ``group`` columns, strips of 16 columns stored k-major (zero padded). A 1-D
    float32 tensor of about ``w.numel()`` elements (more when ``group`` is not a multiple
    of 16)."""
    check_tensor("pack_weights", "w", w, contiguous=False)
    if w.ndim != 3:
        raise ValueError(f"pack_weights: w must be a (T, K, C) tensor, got {tuple(w.shape)}")
    group = check_int("pack_weights", "group", group, 1)
    t, k, c = w.shape
    # ADC groups wider than the stack pack as one group of all C columns
    group = min(group, max(c, 1))
    size = packed_size(t, k, c, group)
    check_products("pack_weights", "the packed size", size, 4)
    if not available():
        raise RuntimeError("native kernels unavailable")
    out = torch.empty(size, dtype=torch.float32)
    if size:
        w = w.contiguous()
        _lib().sedma_pack_weights_f32(w.data_ptr(), t, k, c, group, out.data_ptr())
    return out


@dataclass(frozen=True)
class ReadSpec:
    """What one compiled crossbar read does besides the products (see :func:`fused_read_`
    and :func:`~sedma_torch.rram.native_depthwise.depthwise_read_`)."""

    group: int
    """Columns sharing one ADC range (a physical column tile)."""
    quantise: bool
    """True: the DAC rounds the input to codes and clips at ``+-dac_levels``, as
    :func:`~sedma_torch.rram.crossbar.dac`. False: the input enters in code units at full
    precision (first-order correction's exact input)."""
    noise_std: float
    """Read-noise standard deviation per unit norm of a tile's input row (code units);
    0 = no noise."""
    levels: int
    """ADC levels (``quant_levels(adc_bits)``)."""
    dac_levels: int
    """DAC levels (1 without a DAC, with ranges of 1)."""
    fixed_full: float | None
    """Fixed ADC full scale in code units (saturating), or None (each group auto-ranges)."""
    key: tuple[int, int]
    """The noise stream's key (two 31-bit words)."""
    mode: int = 0
    """0 writes the output, +1 adds to it, -1 subtracts from it."""


def _check_input(name: str, x: torch.Tensor, ndim: int) -> None:
    if (
        not isinstance(x, torch.Tensor)
        or x.ndim != ndim
        or x.dtype != torch.float32
        or x.device.type != "cpu"
    ):
        raise ValueError(
            f"{name}: x must be a {ndim}-d CPU float32 tensor, got "
            f"{tuple(getattr(x, 'shape', ()))} {getattr(x, 'dtype', type(x).__name__)} on "
            f"{getattr(x, 'device', '-')}"
        )
    if not x.is_contiguous():
        raise ValueError(f"{name}: x must be contiguous, got strides {x.stride()}")


def _check_tiles(func: str, tiles: int, cpt: int, c_in: int, what: str) -> None:
    if tiles * cpt < c_in or (tiles - 1) * cpt >= c_in:
        raise ValueError(f"{func}: {tiles} tiles of {cpt} {what} do not cover {c_in}")


def tile_absmax(x: torch.Tensor, cpt: int, tiles: int) -> torch.Tensor:
    """DAC ranges of an input: (tiles, N), the largest ``|x|`` over each image's (or row's)
    channels ``[t cpt, (t + 1) cpt)``, or 1 where they are all zero. ``x`` is (N, C) or
    NCHW (N, C, H, W), contiguous float32 on CPU; N may be 0."""
    ndim = x.ndim if isinstance(x, torch.Tensor) and x.ndim in (2, 4) else 2
    _check_input("tile_absmax", x, ndim)
    cpt = check_int("tile_absmax", "cpt", cpt, 1)
    tiles = check_int("tile_absmax", "tiles", tiles, 1)
    n, c_in = x.shape[:2]
    _check_tiles("tile_absmax", tiles, cpt, c_in, "channels")
    if not available():
        raise RuntimeError("native kernels unavailable")
    out = torch.empty(tiles, n, dtype=torch.float32)
    hw = math.prod(x.shape[2:])
    if n:
        _lib().sedma_tile_absmax_f32(x.data_ptr(), n, c_in, hw, cpt, tiles, out.data_ptr())
    return out


def _read(name, x, geometry, s_in, packed, col_scale, out, spec, noise_offset, packed_var) -> None:
    """Validate the operands of a fused read and run it; ``geometry`` as in the C source
    (its sizes already checked by the caller: x's shape, cpt, kernel, stride, dilation)."""
    n, c_in, _, _, oh, ow, cpt, kh, kw = geometry[:9]
    check_tensor(name, "col_scale", col_scale)
    if col_scale.ndim != 2 or col_scale.shape[0] < 1:
        raise ValueError(
            f"{name}: col_scale must be a (T, C) tensor, T >= 1, got {tuple(col_scale.shape)}"
        )
    t, c = col_scale.shape
    _check_tiles(name, t, cpt, c_in, "channels" if name == "fused_conv_read_" else "rows")
    check_spec(name, spec)
    rows, k = n * oh * ow, cpt * kh * kw
    check_tensor(name, "s_in", s_in, (t, n))
    check_tensor(name, "packed", packed, contiguous=False)
    group = min(spec.group, max(c, 1))  # a group wider than C is one group of C columns
    expected = packed_size(t, k, c, group)
    if packed.numel() != expected or not packed.is_contiguous():
        raise ValueError(
            f"{name}: packed must be pack_weights of a ({t}, {k}, {c}) stack with group "
            f"{spec.group} ({expected} contiguous float32), got {packed.numel()} "
            f"(contiguous={packed.is_contiguous()})"
        )
    if packed.data_ptr() % 32:
        raise ValueError(f"{name}: packed must be 32-byte aligned (pack_weights' output)")
    if packed_var is not None:
        check_tensor(name, "packed_var", packed_var)
        if packed_var.numel() != expected or packed_var.data_ptr() % 32:
            raise ValueError(
                f"{name}: packed_var must be pack_weights of a ({t}, {k}, {c}) variance stack "
                f"with group {spec.group} ({expected} float32, 32-byte aligned), got "
                f"{packed_var.numel()}"
            )
    check_tensor(name, "out", out, contiguous=False)
    if tuple(out.shape) != (rows, c) or out.stride(1) != 1 or (rows > 1 and out.stride(0) < c):
        raise ValueError(
            f"{name}: out must be a ({rows}, {c}) float32 row view (unit column stride, rows "
            f"apart by >= {c}), got {tuple(out.shape)} with strides {out.stride()}"
        )
    check_products(name, "rows x K x C x T", rows, k, c, t)
    # noise pair counters noise_offset + (t rows + r) C + c < noise_offset + T rows C
    noise_offset = check_int(name, "noise_offset", noise_offset, 0, INDEX_LIMIT - t * rows * c)
    check_no_overlap(
        name, "out", out, x=x, s_in=s_in, packed=packed, col_scale=col_scale, packed_var=packed_var
    )
    if not available():
        raise RuntimeError("native kernels unavailable")
    if rows == 0 or c == 0:
        return  # nothing to read (out has no elements)
    geo = (ctypes.c_int64 * len(geometry))(*geometry)
    status = _lib().sedma_fused_read_f32(
        x.data_ptr(),
        ctypes.addressof(geo),
        t,
        c,
        packed.data_ptr(),
        None if packed_var is None else packed_var.data_ptr(),
        group,
        int(bool(spec.quantise)),
        s_in.data_ptr(),
        float(spec.noise_std),
        col_scale.data_ptr(),
        float(spec.levels),
        float(spec.dac_levels),
        -1.0 if spec.fixed_full is None else float(spec.fixed_full),
        spec.key[0] & 0x7FFFFFFF,
        spec.key[1] & 0x7FFFFFFF,
        out.data_ptr(),
        out.stride(0),
        spec.mode,
        noise_offset,
    )
    if status == -2:
        raise ValueError(f"{name}: the kernel rejected the geometry {geometry}")
    if status != 0:
        raise MemoryError(f"{name}: out of memory")


def fused_read_(
    x: torch.Tensor,
    s_in: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: ReadSpec,
    *,
    tile_rows: int,
    noise_offset: int = 0,
    packed_var: torch.Tensor | None = None,
) -> None:
    """One crossbar read of the rows of ``x`` (B, in_features) through the packed weights
    (:func:`pack_weights` of a (T, tile_rows, C) stack) into ``out`` (B, C): the input DAC,
    the matmul of each input tile with its read noise, column ADC, de-quantisation, column
    scale and the digital sum over the tiles, in one pass. Inputs past ``in_features`` in
    the last tile are zero. An empty batch (B = 0) returns at once.

    ``s_in`` (T, B) is the DAC full scale of each row and tile (:func:`tile_absmax`);
    ``col_scale`` (T, C). The read-noise variance is ``spec.noise_std^2`` times the squared
    norm of the tile's input row in code units, plus, with ``packed_var`` (:func:`pack_weights`
    of a (T, tile_rows, C) stack V of variances per weight: state-dependent read noise),
    ``sum_k codes_k^2 V[t, k, c]``; the noise of (tile t, row r, column c) is
    keyed by ``spec.key`` and the 64-bit counter ``noise_offset + (t * B + r) * C + c``
    (``noise_offset`` 0 unless a read continues another's stream), drawn per ADC group, so
    it does not depend on the thread count. Same arithmetic as the eager path (a batched
    matmul, then ``crossbar.adc_dequantise_``) up to float rounding. Every operand is
    checked first (``ValueError`` naming it).
    """
    _check_input("fused_read_", x, 2)
    b, c_in = x.shape
    tile_rows = check_int("fused_read_", "tile_rows", tile_rows, 1)
    geometry = [b, c_in, 1, 1, 1, 1, tile_rows, 1, 1, 1, 1, 1, 1]
    _read("fused_read_", x, geometry, s_in, packed, col_scale, out, spec, noise_offset, packed_var)


def fused_conv_read_(
    x: torch.Tensor,
    s_in: torch.Tensor,
    packed: torch.Tensor,
    col_scale: torch.Tensor,
    out: torch.Tensor,
    spec: ReadSpec,
    *,
    cpt: int,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    noise_offset: int = 0,
    packed_var: torch.Tensor | None = None,
) -> None:
    """:func:`fused_read_` of a convolution (implicit im2col: each output pixel's window is
    gathered while the input is packed, so no patch matrix is stored).

    ``x`` (N, C_in, H, W) is NCHW, contiguous and already padded spatially. Tile t holds
    channels ``[t cpt, (t + 1) cpt)`` (those past C_in are zero) and its ``cpt * kh * kw``
    weight rows are ordered (channel, i, j). ``kernel_size``, ``stride`` and ``dilation``
    are ints >= 1 (or pairs). The output rows are the ``N * H' * W'`` output pixels, ``H'
    = (H - dh (kh - 1) - 1) // sh + 1`` (W' alike, both >= 1): ``out`` is (N * H' * W', C),
    NHWC. ``s_in`` (T, N) holds one DAC range per image and tile (:func:`tile_absmax`).
    N = 0 returns at once.
    """
    func = "fused_conv_read_"
    _check_input(func, x, 4)
    n, c_in, h, w = x.shape
    cpt = check_int(func, "cpt", cpt, 1)
    kh, kw = check_pair(func, "kernel_size", kernel_size)
    sh, sw = check_pair(func, "stride", stride)
    dh, dw = check_pair(func, "dilation", dilation)
    oh, ow = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    if oh < 1 or ow < 1:
        raise ValueError(
            f"{func}: images {h}x{w} are smaller than the kernel {kh}x{kw} with dilation {dh}x{dw}"
        )
    geometry = [n, c_in, h, w, oh, ow, cpt, kh, kw, sh, sw, dh, dw]
    _read(func, x, geometry, s_in, packed, col_scale, out, spec, noise_offset, packed_var)


__all__ = [
    "INDEX_LIMIT",
    "MAX_ELEMENTS",
    "ReadSpec",
    "available",
    "build_library",
    "check_int",
    "check_pair",
    "check_spec",
    "check_tensor",
    "fill_normal_",
    "fused_conv_read_",
    "fused_read_",
    "pack_weights",
    "packed_size",
    "tile_absmax",
]
