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
