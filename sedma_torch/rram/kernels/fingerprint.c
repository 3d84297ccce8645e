/* Content fingerprint of a tensor's bytes (sedma_torch.rram.fingerprint).

   The bytes are read as n little-endian 32-bit words w_i (the last one zero padded).
   In 32-bit unsigned arithmetic, with K = 0x9E3779B9, M1 = 0x7FEB352D, M2 = 0x846CA68B:
       x_i = w_i ^ (K (i + 1)),   a_i = x_i M1,   a_i ^= a_i >> 15
       b_i = (a_i ^ (a_i >> 13)) M2
       lo = sum a_i,  hi = sum b_i   (mod 2^32);   fingerprint = hi 2^32 + lo.
   w_i -> a_i is a bijection (xor with a constant, multiplication by an odd number, an
   xorshift), so a change of any one word always changes lo; other changes collide with
   probability about 2^-64. sedma_torch/rram/fingerprint.py has the same function in
   PyTorch (CUDA, no compiler); the tests check both against a NumPy version. */
#include <stdint.h>
#include <string.h>

uint64_t sedma_fingerprint(const void *data, int64_t nbytes) {
  const unsigned char *bytes = (const unsigned char *)data;
  int64_t n_full = nbytes / 4, n = (nbytes + 3) / 4;
  uint32_t lo = 0u, hi = 0u;
  #pragma omp parallel for reduction(+:lo, hi) schedule(static) if (n_full >= (1 << 18))
  for (int64_t i = 0; i < n_full; ++i) {
    uint32_t w;
    memcpy(&w, bytes + 4 * i, 4);  /* any alignment (a view may start mid-word) */
    uint32_t a = (w ^ (0x9E3779B9u * (uint32_t)(i + 1))) * 0x7FEB352Du;
    a ^= a >> 15;
    lo += a;
    hi += (a ^ (a >> 13)) * 0x846CA68Bu;
  }
  if (n > n_full) {  /* a last partial word, zero padded */
    uint32_t w = 0u;
    memcpy(&w, bytes + 4 * n_full, (size_t)(nbytes - 4 * n_full));
    uint32_t a = (w ^ (0x9E3779B9u * (uint32_t)n)) * 0x7FEB352Du;
    a ^= a >> 15;
    lo += a;
    hi += (a ^ (a >> 13)) * 0x846CA68Bu;
  }
  return ((uint64_t)hi << 32) | lo;
}
