// The arithmetic of cuda/attention.cu, shared with its host mirror (bindings_cuda_attention.cpp) so
// that a machine without a GPU tests the same online softmax, split-K merge and split partition the
// kernels run (tests/test_cuda_host_attention.py). Compiled by nvcc and by the host compiler: no
// CUDA types here.
//
// A partial softmax over some keys is (m, l, acc): m the largest score seen, l = sum exp(s - m),
// acc = sum exp(s - m) v. "Empty" is (-inf, 0, 0): a split with no keys, or a row that sees none.
// Every function below keeps an empty state empty and never forms (-inf) - (-inf), so a row with
// no keys comes out as zeros, not NaN.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cuda/host_device.h"

namespace pe::cuda {

// Positions per KV cache page (KVCache::kPageSize; kv_cache.h is not included, it is host-only).
constexpr int64_t kAttnPageSize = 64;

struct SoftmaxState {
  float m;  // running max of the scores
  float l;  // running sum of exp(score - m)
};

PE_HD SoftmaxState softmax_empty() { return SoftmaxState{-INFINITY, 0.0f}; }

// exp(s - m): the weight of score s when the running max is m (0 when m is -inf: nothing seen).
PE_HD float softmax_weight(float s, float m) { return m == -INFINITY ? 0.0f : expf(s - m); }

// The factor that rescales sums taken relative to max m_old to new max m_new >= m_old.
PE_HD float softmax_rescale(float m_old, float m_new) { return m_old == -INFINITY ? 0.0f : expf(m_old - m_new); }

// Starts folding in a tile of scores whose largest is tile_max: raises st.m and rescales st.l;
// returns the factor the caller applies to its acc. Then each score s of the tile adds
// p = softmax_weight(s, st.m) to st.l and p * v to acc.
PE_HD float softmax_raise_max(SoftmaxState& st, float tile_max) {
  const float m_new = fmaxf(st.m, tile_max);
  const float alpha = softmax_rescale(st.m, m_new);
  st.m = m_new;
  st.l *= alpha;
  return alpha;
}

// One score at a time (the tile form with a tile of one): st absorbs s; the caller sets
// acc = acc * (*alpha) + (*p) * v.
PE_HD void softmax_push(SoftmaxState& st, float s, float* alpha, float* p) {
  *alpha = softmax_raise_max(st, s);
  *p = softmax_weight(s, st.m);
  st.l += *p;
}

// Flash-decoding merge: a becomes the state of a's keys and b's keys together; the caller sets
// acc = acc_a * (*wa) + acc_b * (*wb). Either or both may be empty.
PE_HD void softmax_merge(SoftmaxState& a, SoftmaxState b, float* wa, float* wb) {
  const float m = fmaxf(a.m, b.m);
  *wa = softmax_rescale(a.m, m);
  *wb = softmax_rescale(b.m, m);
  a.m = m;
  a.l = a.l * (*wa) + b.l * (*wb);
}

// The factor that turns acc into the output: 1 / l, or 0 for an empty state.
PE_HD float softmax_finish(SoftmaxState st) { return st.l > 0.0f ? 1.0f / st.l : 0.0f; }

// ALiBi's bias of the score of key `key` for a row whose last visible key is `last` (in causal
// attention the row's own position): slope * (key - last), <= 0 (ops/attention.h).
PE_HD float alibi_bias(float slope, int64_t key, int64_t last) { return slope * float(key - last); }

// Keys [*lo, *hi) of split `split` (of n_split) of a row that sees keys [key_begin, key_end): the
// row's pages are dealt out in runs of whole pages, so a split's keys never share a page with
// another split's and every tile is one page (or its part inside the row's range). A split left
// without pages, or a row without keys, gets *lo == *hi.
PE_HD void attention_split_range(int64_t key_begin, int64_t key_end, int n_split, int split, int64_t* lo,
                                 int64_t* hi) {
  *lo = *hi = key_begin;
  if (key_begin >= key_end || n_split < 1 || split < 0 || split >= n_split) return;
  const int64_t first_page = key_begin / kAttnPageSize, last_page = (key_end - 1) / kAttnPageSize;
  const int64_t per_split = (last_page - first_page + 1 + n_split - 1) / n_split;
  const int64_t p0 = first_page + int64_t(split) * per_split, p1 = p0 + per_split;
  const int64_t a = p0 * kAttnPageSize > key_begin ? p0 * kAttnPageSize : key_begin;
  const int64_t b = p1 * kAttnPageSize < key_end ? p1 * kAttnPageSize : key_end;
  if (a < b) {
    *lo = a;
    *hi = b;
  }
}

// End of the tile that starts at key `pos` of a split ending at `hi`: the end of pos's page, or hi.
PE_HD int64_t attention_tile_end(int64_t pos, int64_t hi) {
  const int64_t page_end = (pos / kAttnPageSize + 1) * kAttnPageSize;
  return page_end < hi ? page_end : hi;
}

// IEEE half <-> float by bits, round to nearest even (host tests build F16 caches with these).
PE_HD uint32_t float_as_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PE_HD float bits_as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PE_HD float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  float mag;
  if (exp == 0) {
    mag = ldexpf(float(man), -24);  // zero or subnormal
  } else if (exp == 31) {
    mag = man ? NAN : INFINITY;
  } else {
    mag = ldexpf(float(man | 0x400u), int(exp) - 25);
  }
  return bits_as_float(float_as_bits(mag) | sign);
}

PE_HD uint16_t float_to_half_bits(float f) {
  const uint32_t bits = float_as_bits(f);
  const uint32_t sign = (bits >> 16) & 0x8000u;
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));  // inf, NaN
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds past 65504: inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): the value in units of 2^-24, rounded to nearest even.
    if (abs < 0x33000000u) return uint16_t(sign);  // below half of the smallest subnormal
    const uint32_t man = (abs & 0x7fffffu) | 0x800000u;
    const int shift = 126 - int(abs >> 23);  // 14..24
    const uint32_t q = man >> shift, rem = man & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return uint16_t(sign | (q + (rem > half || (rem == half && (q & 1u)) ? 1u : 0u)));
  }
  // Normal: rebias the exponent, drop 13 mantissa bits with round to nearest even (a carry into the
  // exponent is the correct result).
  const uint32_t r = abs - 0x38000000u;
  const uint32_t q = r >> 13, rem = r & 0x1fffu;
  return uint16_t(sign | (q + (rem > 0x1000u || (rem == 0x1000u && (q & 1u)) ? 1u : 0u)));
}

}  // namespace pe::cuda
