
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>

/* PERM[m]: the lanes set in the 8-bit mask m, in order (a compress as a permutation) */
static const int32_t PERM[256][8] = {
%PERM%
};
#endif

/* rng._hash32: bijective xorshift-multiply on 32 bits (wrapping, logical shifts). */
static inline uint32_t hh(uint32_t x) {
  x ^= x >> 16; x *= 0x7FEB352Du; x ^= x >> 15; x *= 0x2C1B3C6Du; x ^= x >> 16;
  return x;
}


#include "sedma_inline.h"
/* rng.hash_normal_at: the standard normal of element `index` of the stream keyed by
   (lo, hi): Box-Muller cosine on two 24-bit uniforms from the counters 2i and 2i + 1.
   32-bit counters, as the PyTorch path's int32 indices: collision free for index < 2^31.
   The indices used are the cell index (noise) and 2 x and 2 x + 1 the cell index (device
   spread), below 2^31 since the caller (write_verify_) allows n <= MAX_CELLS = 2^30. */
static inline float hash_normal(uint32_t index, uint32_t lo, uint32_t hi) {
  uint32_t i2 = index * 2u;
  uint32_t h1 = hh(hh(i2 + lo) ^ hi), h2 = hh(hh(i2 + 1u + lo) ^ hi);
  float u1 = ((float)(int32_t)(h1 >> 8) + 0.5f) * (1.0f / 16777216.0f);
  float u2 = (float)(int32_t)(h2 >> 8) * (1.0f / 16777216.0f);
  return sqrtf(-2.0f * ln(u1)) * cos_turn(u2);
}

enum { A_UP, A_DN, S_UP, S_DN, L_UP, L_DN, G_MIN, G_RANGE, NOISE, TOL, G_MAX, START_TOL,
       STATS_TOL, V_SIGMA, V_GMIN, V_GRANGE, N_PARAMS };

#define N_WS 8 /* float work arrays of a block */

/* Drop the cells of a block's list within tolerance (|ga - ta| <= tol), writing their
   conductance to g, and move the others down (all N_WS arrays, in order). Returns how
   many remain. With AVX2, 8 cells at a time: one permutation per array (LUT by mask). */
static int64_t compact(float *g, uint32_t *idx, float *ws, int64_t block, int64_t live,
                       float tol) {
  const float *ga = ws, *ta = ws + block;
  int64_t w = 0, k = 0;
#ifdef __AVX2__
  const __m256 vtol = _mm256_set1_ps(tol);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (; k + 8 <= live; k += 8) {
    __m256 err = _mm256_and_ps(_mm256_sub_ps(_mm256_loadu_ps(ga + k),
                                             _mm256_loadu_ps(ta + k)), absmask);
    unsigned keep = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(err, vtol, _CMP_GT_OQ));
    for (unsigned done = ~keep & 0xFFu; done; done &= done - 1) {
      int j = __builtin_ctz(done);
      g[idx[k + j]] = ga[k + j];
    }
    __m256i perm = _mm256_loadu_si256((const __m256i *)PERM[keep]);
    _mm256_storeu_si256((__m256i *)(idx + w), _mm256_permutevar8x32_epi32(
        _mm256_loadu_si256((const __m256i *)(idx + k)), perm));
    for (int a = 0; a < N_WS; ++a) {
      float *arr = ws + a * block;
      _mm256_storeu_ps(arr + w, _mm256_permutevar8x32_ps(_mm256_loadu_ps(arr + k), perm));
    }
    w += __builtin_popcount(keep);
  }
#endif
  for (; k < live; ++k) {
    if (fabsf(ga[k] - ta[k]) > tol) {
      idx[w] = idx[k];
      for (int a = 0; a < N_WS; ++a) ws[a * block + w] = ws[a * block + k];
      ++w;
    } else {
      g[idx[k]] = ga[k];
    }
  }
  return w;
}

/* One block of m cells starting at flat index `start`. ws: N_WS float arrays and one
   index array of `block` entries. Writes g for all m cells and the block's results. */
static void run_block(float *g, const float *target, const float *initial, int64_t start,
                      int64_t m, const float *p, const uint32_t *seeds, int max_iters,
                      int var_mode, uint32_t var_lo, uint32_t var_hi, const float *var_gmax,
                      const float *var_ascale, float *ws, uint32_t *idx, int64_t block,
                      int64_t *pulses_out, int *iters_out, int64_t *within_out,
                      double *sum_out, float *max_out) {
  /* per live cell: conductance, target, own Gmax and curvature, and the constants of
     its two directions (up = potentiation): nominal pulse number of the target and the
     cell's S = 1 - e^{-L/A} (computed once instead of in every iteration) */
  float *ga = ws, *ta = ws + block, *top = ws + 2 * block, *asc = ws + 3 * block;
  float *ptu = ws + 4 * block, *ptd = ws + 5 * block, *scu = ws + 6 * block;
  float *scd = ws + 7 * block;
  const float g_min = p[G_MIN], g_max = p[G_MAX], tol = p[TOL], g_range = p[G_RANGE];
  int64_t na = 0;
  for (int64_t i = 0; i < m; ++i) {
    float t = fminf(fmaxf(target[start + i], g_min), g_max);
    float g0 = initial ? initial[start + i] : g_min;
    int active = initial ? fabsf(g0 - t) > tol : t > p[START_TOL];
    g[start + i] = g0;
    idx[na] = (uint32_t)(start + i);
    ga[na] = g0;
    ta[na] = t;
    na += active;
  }
  /* each pulsed cell's own Gmax and curvature (programming._variation_at) */
  if (var_mode == 1) {
    const float sigma = p[V_SIGMA], vg_min = p[V_GMIN], vg_range = p[V_GRANGE];
    #pragma omp simd
    for (int64_t k = 0; k < na; ++k) {
      float z = hash_normal(idx[k] * 2u, var_lo, var_hi);
      float z2 = hash_normal(idx[k] * 2u + 1u, var_lo, var_hi);
      top[k] = vg_min + vg_range * fmaxf(1.0f + sigma * z, 0.05f);
      asc[k] = fmaxf(1.0f + sigma * z2, 0.05f);
    }
  } else if (var_mode == 2) {
    for (int64_t k = 0; k < na; ++k) {
      top[k] = var_gmax[idx[k]];
      asc[k] = var_ascale[idx[k]];
    }
  } else {
    for (int64_t k = 0; k < na; ++k) {
      top[k] = g_max;
      asc[k] = 1.0f;
    }
  }
  const float a_up = p[A_UP], a_dn = p[A_DN], s_up = p[S_UP], s_dn = p[S_DN];
  const float l_up = p[L_UP], l_dn = p[L_DN], noise = p[NOISE];
  #pragma omp simd
  for (int64_t k = 0; k < na; ++k) {
    float x = fminf(fmaxf((ta[k] - g_min) / g_range, 0.0f), 1.0f);
    ptu[k] = -a_up * ln1p(-s_up * x);
    ptd[k] = -a_dn * ln1p(-s_dn * x);
    scu[k] = -em1(-l_up / (asc[k] * a_up));
    scd[k] = -em1(-l_dn / (asc[k] * a_dn));
  }
  int64_t live = na, pulses = 0;
  int it = 0;
  while (live > 0 && it < max_iters) {
    const uint32_t lo = seeds[2 * it], hi = seeds[2 * it + 1];
    int32_t psum = 0;  /* int32: a vectorisable conversion; bounded by the caller */
    /* programming._write_verify_step for the live cells, same operation order */
    #pragma omp simd reduction(+:psum)
    for (int64_t k = 0; k < live; ++k) {
      float gk = ga[k], t = ta[k];
      int up = t > gk;
      float sgn = up ? 1.0f : -1.0f;
      float a_nom = up ? a_up : a_dn, s_nom = up ? s_up : s_dn;
      float levels = up ? l_up : l_dn;
      float p_g = -a_nom * ln1p(-s_nom * fminf(fmaxf((gk - g_min) / g_range, 0.0f), 1.0f));
      float p_t = up ? ptu[k] : ptd[k];
      float n = fmaxf(rintf(fabsf(p_t - p_g)), 1.0f);
      float a_cell = asc[k] * a_nom;
      float s_cell = up ? scu[k] : scd[k];
      float span = top[k] - g_min;
      float p_cell = -a_cell * ln1p(-fminf(fmaxf((gk - g_min) / span, 0.0f), 1.0f) * s_cell);
      float p_next = fminf(fmaxf(p_cell + n * sgn, 0.0f), levels);
      float g_next = -em1(-p_next / a_cell) / s_cell * span + g_min;
      if (noise != 0.0f) g_next = g_next + hash_normal(idx[k], lo, hi) * sqrtf(n) * noise;
      ga[k] = fminf(fmaxf(g_next, g_min), top[k]);
      psum += (int32_t)n;
    }
    pulses += psum;
    /* verify: converged cells leave (their final state goes out), the others move down */
    live = compact(g, idx, ws, block, live, tol);
    ++it;
  }
  for (int64_t k = 0; k < live; ++k) g[idx[k]] = ga[k];
  /* programming._error_sums over all cells of the block */
  const float stats_tol = p[STATS_TOL];
  int64_t within = 0;
  double sum = 0.0;
  float mx = 0.0f;
  for (int64_t i = start; i < start + m; ++i) {
    float err = fabsf(g[i] - fminf(fmaxf(target[i], g_min), g_max));
    within += err <= stats_tol;
    sum += err;
    mx = fmaxf(mx, err);
  }
  *pulses_out = pulses;
  *iters_out = it;
  *within_out = within;
  *sum_out = sum;
  *max_out = mx;
}

/* The whole write-verify loop for n cells. g: output conductances (may alias initial);
   initial: start state or NULL (erased at Gmin); seeds: max_iters (lo, hi) pairs;
   var_mode 0: nominal devices, 1: seeded spread keyed by (var_lo, var_hi), 2: per-cell
   arrays var_gmax/var_ascale. counts <- (pulses, iterations, cells within tolerance),
   errs <- (sum |g - t|, max |g - t|). Per-block partial results are combined in block
   order, so the result does not depend on the thread count. The caller (write_verify_)
   validates the operands: n <= 2^30 cells (32-bit cell indices and noise counters),
   block x (most pulses of one cell in one iteration) < 2^31 (int32 pulse sums). Returns 0,
   -1 when out of memory, -2 for invalid sizes. */
int sedma_write_verify_f32(float *g, const float *target, const float *initial, int64_t n,
                           const float *params, const uint32_t *seeds, int32_t max_iters,
                           int32_t var_mode, uint32_t var_lo, uint32_t var_hi,
                           const float *var_gmax, const float *var_ascale, int64_t block,
                           int64_t *counts, double *errs) {
  if (n < 0 || n > (1 << 30) || block < 1 || block > (1 << 30) || max_iters < 1) return -2;
  int64_t nblocks = (n + block - 1) / block;
  int64_t *bp = (int64_t *)malloc(sizeof(int64_t) * 2 * (size_t)(nblocks + 1));
  int *bi = (int *)malloc(sizeof(int) * (size_t)(nblocks + 1));
  double *bs = (double *)malloc(sizeof(double) * (size_t)(nblocks + 1));
  float *bm = (float *)malloc(sizeof(float) * (size_t)(nblocks + 1));
  int status = (bp && bi && bs && bm) ? 0 : -1;
  if (status == 0) {
    #pragma omp parallel if (nblocks > 1)
    {
      float *ws = (float *)malloc(sizeof(float) * N_WS * (size_t)block);
      uint32_t *idx = (uint32_t *)malloc(sizeof(uint32_t) * (size_t)block);
      if (!ws || !idx) {
        #pragma omp atomic write
        status = -1;
      }
      #pragma omp for schedule(dynamic, 4)
      for (int64_t b = 0; b < nblocks; ++b) {
        if (!ws || !idx) continue;
        int64_t start = b * block, m = n - start < block ? n - start : block;
        run_block(g, target, initial, start, m, params, seeds, max_iters, var_mode, var_lo,
                  var_hi, var_gmax, var_ascale, ws, idx, block, &bp[2 * b], &bi[b],
                  &bp[2 * b + 1], &bs[b], &bm[b]);
      }
      free(ws);
      free(idx);
    }
  }
  if (status == 0) {
    int64_t pulses = 0, within = 0;
    int iters = 0;
    double sum = 0.0;
    float mx = 0.0f;
    for (int64_t b = 0; b < nblocks; ++b) {
      pulses += bp[2 * b];
      within += bp[2 * b + 1];
      iters = bi[b] > iters ? bi[b] : iters;
      sum += bs[b];
      mx = fmaxf(mx, bm[b]);
    }
    counts[0] = pulses;
    counts[1] = iters;
    counts[2] = within;
    errs[0] = sum;
    errs[1] = mx;
  }
  free(bp);
  free(bi);
  free(bs);
  free(bm);
  return status;
}
