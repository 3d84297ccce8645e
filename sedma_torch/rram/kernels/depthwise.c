
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif


#include "sedma_inline.h"

/* Normals of the counter blocks b0 .. b0 + nblocks - 1 (16 counters each) into out:
   pair q = 8 b + l (l < 8) gives the cosine to counter 16 b + l and the sine to 16 b + 8 + l.
   The pairs are drawn by a flat vector loop in runs of up to PAIRS, then dealt to their
   blocks. Pair q hashes the 64-bit counters 2q and 2q + 1 (key_hi: the high 32 bits enter
   the key), a run split where those high bits change so that the vector loop is 32-bit. */
#define PAIRS 256
static void normal_blocks(float *restrict out, int64_t b0, int64_t nblocks, uint32_t lo,
                          uint32_t hi) {
  float cosv[PAIRS], sinv[PAIRS];
  for (int64_t first = 0; first < nblocks; first += PAIRS / 8) {
    int64_t blocks = nblocks - first < PAIRS / 8 ? nblocks - first : PAIRS / 8;
    uint64_t q0 = 8u * (uint64_t)(b0 + first);
    for (int64_t p0 = 0; p0 < 8 * blocks;) {
      uint64_t q = q0 + (uint64_t)p0;
      int64_t run = pairs_in_run(q);
      int64_t p1 = 8 * blocks - p0 <= run ? 8 * blocks : p0 + run;
      uint32_t khi = key_hi(hi, 2 * q), base = 2u * (uint32_t)q;
      #pragma omp simd
      for (int64_t p = p0; p < p1; ++p) {
        uint32_t i2 = base + 2u * (uint32_t)(p - p0);
        uint32_t a = h32(h32(i2 + lo) ^ khi), c2 = h32(h32(i2 + 1u + lo) ^ khi);
        float u1 = ((float)(int32_t)(a >> 8) + 0.5f) * (1.0f / 16777216.0f);
        float u2 = (float)(int32_t)(c2 >> 8) * (1.0f / 16777216.0f);
        float r = sqrtf(-2.0f * ln(u1)), c, s;
        sincos_turn(u2, &c, &s);
        cosv[p] = r * c;
        sinv[p] = r * s;
      }
      p0 = p1;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      float *o = out + 16 * (first + b);
      for (int l = 0; l < 8; ++l) {
        o[l] = cosv[8 * b + l];
        o[8 + l] = sinv[8 * b + l];
      }
    }
  }
}

int sedma_depthwise_normals_f32(float *out, int64_t e0, int64_t n, uint32_t lo, uint32_t hi) {
  /* the stream's elements e0 .. e0 + n - 1 (for the tests; the caller checks e0 >= 0 and
     e0 + n <= 2^62); -1 when out of memory, -2 for an invalid range */
  if (e0 < 0 || n < 0) return -2;
  if (n == 0) return 0;
  int64_t b0 = e0 >> 4, nb = ((e0 & 15) + n + 15) >> 4;
  float *buf = (float *)malloc((size_t)(nb * 16) * sizeof(float));
  if (!buf) return -1;
  normal_blocks(buf, b0, nb, lo, hi);
  memcpy(out, buf + (e0 & 15), (size_t)n * sizeof(float));
  free(buf);
  return 0;
}

/* Window sums of the pixels 0 .. len - 1 of the phase grid (codes shifted to the first):
   a[f] = sum_k w[k * ws] codes[offs[k] + f] and, when ss is not NULL, ss[f] = sum_k
   codes[offs[k] + f]^2. With AVX2 all taps of 8 pixels accumulate in registers, and a, ss
   and the codes are read/written up to 7 floats past len (the buffers have room). */
static void window_sums(const float *restrict codes, const int64_t *restrict offs, int64_t K,
                        const float *restrict w, int64_t ws, int64_t len, float *restrict a,
                        float *restrict ss) {
#if defined(__AVX2__) && defined(__FMA__)
  for (int64_t f = 0; f < len; f += 8) {
    __m256 acc = _mm256_setzero_ps(), sq = _mm256_setzero_ps();
    if (ss) {
      for (int64_t k = 0; k < K; ++k) {
        __m256 c = _mm256_loadu_ps(codes + offs[k] + f);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + k * ws), c, acc);
        sq = _mm256_fmadd_ps(c, c, sq);
      }
      _mm256_storeu_ps(ss + f, sq);
    } else {
      for (int64_t k = 0; k < K; ++k)
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(w + k * ws),
                              _mm256_loadu_ps(codes + offs[k] + f), acc);
    }
    _mm256_storeu_ps(a + f, acc);
  }
#else
  #pragma omp simd
  for (int64_t f = 0; f < len; ++f) a[f] = w[0] * codes[offs[0] + f];
  for (int64_t k = 1; k < K; ++k) {
    const float *ck = codes + offs[k];
    float wk = w[k * ws];
    #pragma omp simd
    for (int64_t f = 0; f < len; ++f) a[f] += wk * ck[f];
  }
  if (ss) {
    #pragma omp simd
    for (int64_t f = 0; f < len; ++f) ss[f] = codes[offs[0] + f] * codes[offs[0] + f];
    for (int64_t k = 1; k < K; ++k) {
      const float *ck = codes + offs[k];
      #pragma omp simd
      for (int64_t f = 0; f < len; ++f) ss[f] += ck[f] * ck[f];
    }
  }
#endif
}

#define CHUNK 1024
#define CBLOCK 8

/* The constants of one read (see sedma_depthwise_read_f32). */
struct read_args {
  int64_t n, C, H, W, oh, ow, K, m, P, S, wph, rows, CH, plane, group, G;
  const int64_t *offs;
  const float *w, *v, *col_scale, *adc_full;
  float noise_std, levels, dac_levels, fixed_full, sign;
  int noisy, saturate, mode;
  uint32_t lo, hi;
  int64_t e_offset;
  float *out;
};

/* Steps 2-4 of the read of channel t of image img, whose codes are in phase planes:
   read noise, window sums, ADC, de-quantisation, column scale, output. */
static void read_channel(const struct read_args *q, int64_t img, int64_t t, float s,
                         const float *codes, float *acc, float *sd, float *full,
                         float *noise, float *codes2, float *var) {
  const int64_t m = q->m, P = q->P, ow = q->ow, wph = q->wph, CH = q->CH;
  /* the read noise of this image and channel: its output elements' counters (e_offset +
     the NCHW index of the output) are e_offset + (img C + t) m P .. e_offset + (img C + t
     + 1) m P - 1 */
  const float *nz = NULL;
  if (q->noisy) {
    int64_t e0 = q->e_offset + (img * q->C + t) * m * P;
    normal_blocks(noise, e0 >> 4, ((e0 & 15) + m * P + 15) >> 4, q->lo, q->hi);
    nz = noise + (e0 & 15);
  }
  const float *wt = q->w + t * q->K * m, *cs = q->col_scale + t * m;
  const float *vt = q->v ? q->v + t * q->K * m : NULL;
  if (vt) {  /* squared codes of the channel: the state-dependent variance product */
    #pragma omp simd
    for (int64_t k = 0; k < q->plane; ++k) codes2[k] = codes[k] * codes[k];
  }
  const float unit = s / (q->levels * q->dac_levels), levels = q->levels;
  for (int64_t y0 = 0; y0 < q->oh; y0 += q->rows) {
    int64_t y1 = y0 + q->rows < q->oh ? y0 + q->rows : q->oh, len = (y1 - y0) * wph;
    /* window products and window norms on the phase grid */
    for (int64_t j = 0; j < m; ++j)
      window_sums(codes + y0 * wph, q->offs, q->K, wt + j, m, len, acc + j * CH,
                  j == 0 && q->noisy ? sd : NULL);
    if (q->noisy) {
      #pragma omp simd
      for (int64_t f = 0; f < len; ++f) sd[f] = q->noise_std * sqrtf(sd[f]);
    }
    if (vt)  /* var[j][f] = sum_k codes_k^2 V[k, j] */
      for (int64_t j = 0; j < m; ++j)
        window_sums(codes2 + y0 * wph, q->offs, q->K, vt + j, m, len, var + j * CH, NULL);
    /* per output row: read noise, ADC per group of columns, de-quantisation, column
       scale, output */
    for (int64_t y = y0; y < y1; ++y) {
      int64_t cb = (y - y0) * wph;
      if (q->noisy && vt)
        for (int64_t j = 0; j < m; ++j) {
          float *a = acc + j * CH + cb;
          const float *z = nz + j * P + y * ow, *d = sd + cb, *vv = var + j * CH + cb;
          #pragma omp simd
          for (int64_t p = 0; p < ow; ++p) a[p] += sqrtf(fmaxf(d[p] * d[p] + vv[p], 0.0f)) * z[p];
        }
      else if (q->noisy)
        for (int64_t j = 0; j < m; ++j) {
          float *a = acc + j * CH + cb;
          const float *z = nz + j * P + y * ow, *d = sd + cb;
          #pragma omp simd
          for (int64_t p = 0; p < ow; ++p) a[p] += d[p] * z[p];
        }
      for (int64_t g0 = 0; g0 < m; g0 += q->group) {
        int64_t g1 = g0 + q->group < m ? g0 + q->group : m;
        if (!q->saturate) {
          const float *a0 = acc + g0 * CH + cb;
          #pragma omp simd
          for (int64_t p = 0; p < ow; ++p) full[p] = fabsf(a0[p]);
          for (int64_t j = g0 + 1; j < g1; ++j) {
            const float *a = acc + j * CH + cb;
            #pragma omp simd
            for (int64_t p = 0; p < ow; ++p) full[p] = fmaxf(full[p], fabsf(a[p]));
          }
          #pragma omp simd
          for (int64_t p = 0; p < ow; ++p) full[p] = full[p] > 0.0f ? full[p] : 1.0f;
        }
        for (int64_t j = g0; j < g1; ++j) {
          const float *a = acc + j * CH + cb;
          float *o = q->out + ((img * q->C + t) * m + j) * P + y * ow;
          float scale = q->sign * unit * cs[j];
          if (q->saturate) {
            float ff = q->adc_full ? q->adc_full[t * q->G + g0 / q->group] : q->fixed_full;
            float inv = levels / ff, step = ff * scale;
            if (q->mode == 0) {
              #pragma omp simd
              for (int64_t p = 0; p < ow; ++p)
                o[p] = fminf(fmaxf(rintf(a[p] * inv), -levels), levels) * step;
            } else {
              #pragma omp simd
              for (int64_t p = 0; p < ow; ++p)
                o[p] += fminf(fmaxf(rintf(a[p] * inv), -levels), levels) * step;
            }
          } else if (q->mode == 0) {
            #pragma omp simd
            for (int64_t p = 0; p < ow; ++p)
              o[p] = rintf(a[p] * (levels / full[p])) * (full[p] * scale);
          } else {
            #pragma omp simd
            for (int64_t p = 0; p < ow; ++p)
              o[p] += rintf(a[p] * (levels / full[p])) * (full[p] * scale);
          }
        }
      }
    }
  }
}

static inline float dac_code(float v, float mult, int quantise, float dac_levels) {
  float c = v * mult;
  return quantise ? fminf(fmaxf(rintf(c), -dac_levels), dac_levels) : c;
}

/* One crossbar read of a depthwise convolution.

   x: images (n, c, h, w) float32, spatially padded, NCHW contiguous or, with
   channels_last, stored NHWC; geometry = {n, c, h, w, oh, ow, kh, kw, sh, sw, dh, dw}.
   Channel t is input tile t: its kh kw weight rows (i, j order) hold m columns, weights
   (c, kh kw, m). s_in (c, n): DAC full scale of each channel (tile) and image, or NULL: the
   largest |x| of the image's channel (1 where it is all zero). col_scale (c, m). adc_full
   (c, ceil(m / group)) or NULL: calibrated ADC full scales of each channel and column
   group (saturating; else fixed_full > 0, saturating, else auto-ranged). out: NCHW
   contiguous (n, c m, oh, ow), output channel t m + j; mode 0 writes, +1 adds, -1
   subtracts. The read noise of output element e (its NCHW index) has the counter e_offset
   + e. The caller (depthwise_read_) validates all operands -- shapes, geometry >= 1 and
   consistent, 1 <= group <= m, sh <= h, sw <= w, index products below 2^62 -- the checks
   here only stop a call that bypasses it from reading outside x. Returns 0, -1 when out
   of memory, -2 for an invalid geometry.

   Tasks are (image, channel) -- (image, block of CBLOCK channels) for NHWC input, whose
   channels are read together. The DAC writes each channel's plane into sh x sw stride
   phases (phase (y % sh, x % sw) holds rows y / sh, columns x / sw, wph columns a row),
   so that tap (i, j) of the output pixels (y, 0 .. wph - 1) is one contiguous run of a
   phase. Output rows then go in chunks of about CHUNK pixels of that grid (columns >= ow
   computed but unused): window sums in registers, then per row the read noise, ADC and
   output. */
int sedma_depthwise_read_f32(const float *x, const int64_t *geometry, int channels_last,
                             int64_t m, const float *w, const float *v, const float *s_in,
                             const float *col_scale, int64_t group, int quantise,
                             float noise_std, float levels, float dac_levels, float fixed_full,
                             const float *adc_full, uint32_t lo, uint32_t hi, float *out, int mode, int64_t e_offset) {
  const int64_t n = geometry[0], C = geometry[1], H = geometry[2], W = geometry[3];
  const int64_t oh = geometry[4], ow = geometry[5], kh = geometry[6], kw = geometry[7];
  const int64_t sh = geometry[8], sw = geometry[9], dh = geometry[10], dw = geometry[11];
  for (int i = 0; i < 12; ++i)
    if (geometry[i] < (i < 4 ? 0 : 1)) return -2;
  if (m < 0 || group < 1 || e_offset < 0 || sh > H || sw > W
      || H - dh * (kh - 1) - 1 < 0 || W - dw * (kw - 1) - 1 < 0
      || oh != (H - dh * (kh - 1) - 1) / sh + 1 || ow != (W - dw * (kw - 1) - 1) / sw + 1)
    return -2;
  if (n == 0 || C == 0 || m == 0) return 0;
  const int64_t K = kh * kw, P = oh * ow;
  const int64_t hph = (H + sh - 1) / sh, wph = (W + sw - 1) / sw, S = hph * wph;
  const int64_t plane = sh * sw * S + wph + kw * dw + 16;
  const int64_t rows = wph >= CHUNK ? 1 : CHUNK / wph;
  const int64_t cblock = channels_last ? CBLOCK : 1, blocks = (C + cblock - 1) / cblock;
  int64_t *offs = (int64_t *)malloc((size_t)K * sizeof(int64_t));
  if (!offs) return -1;
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t k = 0; k < kw; ++k) {
      int64_t ry = i * dh, rx = k * dw;
      offs[i * kw + k] = ((ry % sh) * sw + rx % sw) * S + (ry / sh) * wph + rx / sw;
    }
  struct read_args q = {n, C, H, W, oh, ow, K, m, P, S, wph, rows, rows * wph, plane, group,
                        (m + group - 1) / group, offs, w, v, col_scale, adc_full, noise_std,
                        levels, dac_levels, fixed_full,
                        mode < 0 ? -1.0f : 1.0f, noise_std > 0.0f || v != NULL,
                        fixed_full > 0.0f || adc_full != NULL, mode,
                        lo, hi, e_offset, out};
  int status = 0;
  int64_t tasks = n * blocks;
  #pragma omp parallel if (tasks > 1 && n * C * (H * W + m * P * K) >= 131072)
  {
  /* zeroed once: phase cells no input maps to stay 0 (read only for unused columns) */
  float *codes = (float *)calloc((size_t)(cblock * plane), sizeof(float));
  float *acc = (float *)malloc((size_t)(m * q.CH + 16) * sizeof(float));
  float *sd = (float *)malloc((size_t)(q.CH + 16) * sizeof(float));
  float *full = (float *)malloc((size_t)(wph + 16) * sizeof(float));
  float *noise = q.noisy ? (float *)malloc((size_t)(m * P + 32) * sizeof(float)) : NULL;
  float *codes2 = v ? (float *)calloc((size_t)plane, sizeof(float)) : NULL;
  float *var = v ? (float *)malloc((size_t)(m * q.CH + 16) * sizeof(float)) : NULL;
  int ok = codes && acc && sd && full && (!q.noisy || noise) && (!v || (codes2 && var));
  if (!ok) {
    #pragma omp atomic write
    status = -1;
  }
  #pragma omp for schedule(static)
  for (int64_t task = 0; task < tasks; ++task) {
    if (!ok) continue;
    int64_t img = task / blocks, t0 = (task % blocks) * cblock;
    int64_t cb = C - t0 < cblock ? C - t0 : cblock;
    float s[CBLOCK], mult[CBLOCK];
    /* 1. DAC ranges and the DAC into the stride phases of each channel */
    if (!channels_last) {
      const float *src = x + (img * C + t0) * H * W;
      if (s_in) {
        s[0] = s_in[t0 * n + img];
      } else {
        float mx = 0.0f;
        #pragma omp simd reduction(max:mx)
        for (int64_t k = 0; k < H * W; ++k) mx = fmaxf(mx, fabsf(src[k]));
        s[0] = mx > 0.0f ? mx : 1.0f;
      }
      mult[0] = dac_levels / s[0];
      for (int64_t y = 0; y < H; ++y)
        for (int64_t ph = 0; ph < sw; ++ph) {
          const float *row = src + y * W + ph;
          int64_t len = (W - ph + sw - 1) / sw;
          float *dst = codes + ((y % sh) * sw + ph) * S + (y / sh) * wph;
          float mu = mult[0];
          if (sw == 1) {
            #pragma omp simd
            for (int64_t xx = 0; xx < len; ++xx)
              dst[xx] = dac_code(row[xx], mu, quantise, dac_levels);
          } else {
            #pragma omp simd
            for (int64_t xx = 0; xx < len; ++xx)
              dst[xx] = dac_code(row[xx * sw], mu, quantise, dac_levels);
          }
        }
    } else {
      const float *src = x + img * H * W * C + t0;
      if (s_in) {
        for (int64_t c = 0; c < cb; ++c) s[c] = s_in[(t0 + c) * n + img];
      } else {
        float mx[CBLOCK] = {0};
        for (int64_t k = 0; k < H * W; ++k)
          for (int64_t c = 0; c < cb; ++c) mx[c] = fmaxf(mx[c], fabsf(src[k * C + c]));
        for (int64_t c = 0; c < cb; ++c) s[c] = mx[c] > 0.0f ? mx[c] : 1.0f;
      }
      for (int64_t c = 0; c < cb; ++c) mult[c] = dac_levels / s[c];
      for (int64_t y = 0; y < H; ++y) {
        float *row = codes + (y % sh) * sw * S + (y / sh) * wph;
        for (int64_t xx = 0; xx < W; ++xx) {
          const float *px = src + (y * W + xx) * C;
          float *dst = row + (xx % sw) * S + xx / sw;
          for (int64_t c = 0; c < cb; ++c)
            dst[c * plane] = dac_code(px[c], mult[c], quantise, dac_levels);
        }
      }
    }
    for (int64_t c = 0; c < cb; ++c)
      read_channel(&q, img, t0 + c, s[c], codes + c * plane, acc, sd, full, noise, codes2, var);
  }
  free(codes);
  free(acc);
  free(sd);
  free(full);
  free(noise);
  free(codes2);
  free(var);
  }
  free(offs);
  return status;
}
