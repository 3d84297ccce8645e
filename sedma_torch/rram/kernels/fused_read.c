
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif


#include "sedma_inline.h"
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
#if defined(__AVX512BF16__)
/* The variance product in bfloat16 (AVX512_BF16 vdpbf16ps: two products per fp32 lane and
   instruction, fp32 accumulation), twice the fp32 kernel's products per instruction. The
   operands are pairs along k: a holds (codes_k^2, codes_{k+1}^2) of each row as one 32-bit
   word ([kp][MR]), each strip of V holds (V[k][j], V[k+1][j]) at [kp][j][2]. Only the
   variance of the read noise goes this way (sedma_pack_var_bf16): both operands are >= 0,
   so the relative error of a variance is at most that of bfloat16 rounding (2^-8) and the
   noise std's at most 2^-9; the read's own product stays float32. */
#define SEDMA_BF16_VAR 1
static inline void kernel_bf16(const uint32_t *restrict a, const uint16_t *restrict b0,
                               const uint16_t *restrict b1, int64_t KP, float *restrict c,
                               int64_t ldc) {
  __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
  __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
  __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
  __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
  __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
  __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
  if (b1) {
    for (int64_t k = 0; k < KP; ++k) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(b0 + 2 * NR * k);
      __m512bh w1 = (__m512bh)_mm512_loadu_si512(b1 + 2 * NR * k);
      const uint32_t *ak = a + MR * k;
      __m512bh x;
      x = (__m512bh)_mm512_set1_epi32((int)ak[0]); c00 = _mm512_dpbf16_ps(c00, x, w0); c01 = _mm512_dpbf16_ps(c01, x, w1);
      x = (__m512bh)_mm512_set1_epi32((int)ak[1]); c10 = _mm512_dpbf16_ps(c10, x, w0); c11 = _mm512_dpbf16_ps(c11, x, w1);
      x = (__m512bh)_mm512_set1_epi32((int)ak[2]); c20 = _mm512_dpbf16_ps(c20, x, w0); c21 = _mm512_dpbf16_ps(c21, x, w1);
      x = (__m512bh)_mm512_set1_epi32((int)ak[3]); c30 = _mm512_dpbf16_ps(c30, x, w0); c31 = _mm512_dpbf16_ps(c31, x, w1);
      x = (__m512bh)_mm512_set1_epi32((int)ak[4]); c40 = _mm512_dpbf16_ps(c40, x, w0); c41 = _mm512_dpbf16_ps(c41, x, w1);
      x = (__m512bh)_mm512_set1_epi32((int)ak[5]); c50 = _mm512_dpbf16_ps(c50, x, w0); c51 = _mm512_dpbf16_ps(c51, x, w1);
    }
  } else {
    for (int64_t k = 0; k < KP; ++k) {
      __m512bh w0 = (__m512bh)_mm512_loadu_si512(b0 + 2 * NR * k);
      const uint32_t *ak = a + MR * k;
      c00 = _mm512_dpbf16_ps(c00, (__m512bh)_mm512_set1_epi32((int)ak[0]), w0);
      c10 = _mm512_dpbf16_ps(c10, (__m512bh)_mm512_set1_epi32((int)ak[1]), w0);
      c20 = _mm512_dpbf16_ps(c20, (__m512bh)_mm512_set1_epi32((int)ak[2]), w0);
      c30 = _mm512_dpbf16_ps(c30, (__m512bh)_mm512_set1_epi32((int)ak[3]), w0);
      c40 = _mm512_dpbf16_ps(c40, (__m512bh)_mm512_set1_epi32((int)ak[4]), w0);
      c50 = _mm512_dpbf16_ps(c50, (__m512bh)_mm512_set1_epi32((int)ak[5]), w0);
    }
  }
  _mm512_storeu_ps(c + 0 * ldc, c00); _mm512_storeu_ps(c + 1 * ldc, c10);
  _mm512_storeu_ps(c + 2 * ldc, c20); _mm512_storeu_ps(c + 3 * ldc, c30);
  _mm512_storeu_ps(c + 4 * ldc, c40); _mm512_storeu_ps(c + 5 * ldc, c50);
  if (b1) {
    _mm512_storeu_ps(c + 0 * ldc + NR, c01); _mm512_storeu_ps(c + 1 * ldc + NR, c11);
    _mm512_storeu_ps(c + 2 * ldc + NR, c21); _mm512_storeu_ps(c + 3 * ldc + NR, c31);
    _mm512_storeu_ps(c + 4 * ldc + NR, c41); _mm512_storeu_ps(c + 5 * ldc + NR, c51);
  }
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

/* Round-to-nearest-even float -> bfloat16 bits (finite inputs). */
static inline uint16_t to_bf16(float f) {
  union { float f; uint32_t u; } v = {f};
  uint32_t u = v.u;
  u += 0x7FFFu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* 1 when this build has the bfloat16 variance product (kernel_bf16), else 0. */
int sedma_bf16_variance(void) {
#ifdef SEDMA_BF16_VAR
  return 1;
#else
  return 0;
#endif
}

/* bfloat16 elements of sedma_pack_var_bf16 of a (T, K, C) stack: K rounded up to even. */
int64_t sedma_packed_var_bf16_size(int64_t T, int64_t K, int64_t C, int64_t group) {
  return sedma_packed_size(T, K + (K & 1), C, group);
}

/* A (T, K, C) stack of read-noise variances packed for the bfloat16 variance product:
   the strips of sedma_pack_weights_f32 with the rows in pairs, strip s of group g of tile t
   holding bf16(V[t, k, c]) at [k / 2][j][k % 2] (zero padded, K rounded up to even). */
void sedma_pack_var_bf16(const float *restrict v, int64_t T, int64_t K, int64_t C,
                         int64_t group, uint16_t *restrict out) {
  if (T <= 0 || K <= 0 || C <= 0 || group < 1) return;
  int64_t KP = (K + 1) / 2, G = ceil_div(C, group), gs = ceil_div(group, NR);
  int64_t per_t = sedma_packed_var_bf16_size(1, K, C, group);
  #pragma omp parallel for collapse(2) schedule(static)
  for (int64_t t = 0; t < T; ++t)
    for (int64_t g = 0; g < G; ++g) {
      int64_t c0 = g * group, c1 = c0 + group < C ? c0 + group : C;
      uint16_t *o = out + t * per_t + g * gs * 2 * KP * NR;
      for (int64_t s = 0; s * NR < c1 - c0; ++s)
        for (int64_t k = 0; k < 2 * KP; ++k)
          for (int64_t j = 0; j < NR; ++j) {
            int64_t col = c0 + s * NR + j;
            float val = k < K && col < c1 ? v[(t * K + k) * C + col] : 0.0f;
            o[((s * KP + k / 2) * NR + j) * 2 + (k & 1)] = to_bf16(val);
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
   variance per weight V, packed as the weights: one more product, codes^2 @ V; with
   var_bf16, vp is sedma_pack_var_bf16's bfloat16 packing of V and the product runs in
   bfloat16 with float32 sums, kernel_bf16; a build without it returns -2); the
   noise of (t, r, c) is drawn per ADC group, keyed by the 64-bit pair counter counter0 +
   (t * rows + r) * C + c (rows: the read's n * oh * ow rows). Then the column ADC
   (`levels`, groups of `group` columns; full scale adc_full[t * G + g] of tile t and group
   g when adc_full is not NULL (calibrated ranges, G = ceil(C / group)), else fixed_full
   > 0, both saturating, else each row's auto-range),
   de-quantisation (s_in / (levels * dac_levels)), the column scale col_scale (T, C) and the
   sum over t.
   geometry = {n, c_in, h, w, oh, ow, cpt, kh, kw, sh, sw, dh, dw} (struct source).
   The caller (native_rng._read) validates all operands: shapes, strides, index products
   below 2^62, 1 <= group <= C; the checks here only stop a call that bypasses it from
   reading outside x. Returns 0, -1 when out of memory, -2 for an invalid geometry. */
int sedma_fused_read_f32(const float *x, const int64_t *geometry, int64_t T, int64_t C,
                         const float *restrict wp, const void *restrict vp, int var_bf16,
                         int64_t group, int quantise,
                         const float *s_in, float noise_std, const float *col_scale,
                         float levels, float dac_levels, float fixed_full,
                         const float *adc_full, uint32_t lo,
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
#ifndef SEDMA_BF16_VAR
  if (var_bf16) return -2;
#endif
  if (src.n == 0 || C == 0) return 0;
  int64_t pix = src.oh * src.ow, B = src.n * pix, K = src.cpt * src.kh * src.kw;
  int64_t G = ceil_div(C, group), gs = ceil_div(group, NR), ldc = gs * NR;
  int64_t per_t = sedma_packed_size(1, K, C, group);
  int64_t KP = (K + 1) / 2, per_tv = sedma_packed_var_bf16_size(1, K, C, group);
  const float *vp32 = var_bf16 ? NULL : (const float *)vp;
  const uint16_t *vp16 = var_bf16 ? (const uint16_t *)vp : NULL;
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
  int saturate = fixed_full > 0.0f || adc_full != NULL;
  #pragma omp parallel if (tasks > 1 && B * K * C * T >= 262144)
  {
  float *apack = alloc64(chunk_blocks * MR * K);
  float *cbuf = alloc64(MR * ldc);
  float *vbuf = vp ? alloc64(MR * ldc) : NULL;
  float *apack2 = vp ? alloc64(chunk_blocks * MR * (var_bf16 ? KP : K)) : NULL;
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
      if (vp32) {  /* squared codes for the variance product */
        const float *a = apack;
        #pragma omp simd
        for (int64_t k = 0; k < nb * MR * K; ++k) apack2[k] = a[k] * a[k];
      } else if (vp16) {  /* squared codes in bfloat16 pairs along k ([kp][MR] per block) */
        uint32_t *pairs = (uint32_t *)apack2;
        for (int64_t b = 0; b < nb; ++b) {
          const float *a = apack + b * MR * K;
          uint32_t *d = pairs + b * MR * KP;
          for (int64_t kp = 0; kp < KP; ++kp)
            for (int64_t m = 0; m < MR; ++m) {
              float lo = a[2 * kp * MR + m], hi = 2 * kp + 1 < K ? a[(2 * kp + 1) * MR + m] : 0.0f;
              d[kp * MR + m] = (uint32_t)to_bf16(lo * lo) | ((uint32_t)to_bf16(hi * hi) << 16);
            }
        }
      }
      const float *vt = vp32 ? vp32 + t * per_t + g * gs * K * NR : NULL;
      const uint16_t *vt16 = vp16 ? vp16 + t * per_tv + g * gs * 2 * KP * NR : NULL;
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
#ifdef SEDMA_BF16_VAR
        if (vt16) {
          const uint32_t *ap = (const uint32_t *)apack2 + b * MR * KP;
          for (s = 0; s < strips; s += 2)
            kernel_bf16(ap, vt16 + s * 2 * KP * NR,
                        s + 1 < strips ? vt16 + (s + 1) * 2 * KP * NR : NULL, KP,
                        vbuf + s * NR, ldc);
        }
#endif
        for (int64_t i = 0; i < MR; ++i) {
          int64_t r = r0 + b * MR + i;
          if (r >= r1) break;
          float *v = cbuf + i * ldc;
          float sdev = sd[b * MR + i];
          if (vp) {
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
          float full = adc_full ? adc_full[t * G + g] : fixed_full;
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
