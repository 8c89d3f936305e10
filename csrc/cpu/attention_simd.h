// attention_kernels.h's two products, written once over a vector-traits type V (F: vector of W floats;
// load_f32/load_f16/load_i8 with a count for tails, set1/set1_f16, fmadd, store). Included by one file
// per ISA; everything here has internal linkage so each ISA keeps its own copy.
#pragma once
#include <cstdint>
#include <limits>
#include <utility>

#include "cpu/attention_kernels.h"
#include "ggml_types.h"

namespace pe::cpu {
namespace {

// W (or a tail of n < W) cache elements from element i of a block, as floats (Q8: unscaled).
template <class V, KVElem E>
PE_ATTN_INLINE typename V::F load_kv(const void* base, int64_t i, int n) {
  if constexpr (E == KVElem::F16) return V::load_f16(static_cast<const fp16_t*>(base) + i, n);
  else if constexpr (E == KVElem::F32) return V::load_f32(static_cast<const float*>(base) + i, n);
  else return V::load_i8(static_cast<const int8_t*>(base) + i, n);
}

// Vectors in flight per row: FMA latency needs several independent accumulators when rows are few;
// with many rows the rows provide them. Never more than the ISA's registers hold (V::kRegs) beside a
// key or value vector per chain and the broadcast: AVX2's 8 rows x 2 chains spilled its 16 ymm
// registers in the inner loop. SmolLM2 F16 pp512 on the AVX2 path (Zen 4, 2 threads, perf): scores and
// values took 11 % of the matmul tiles' time each, now 8.6 % (4 rows x 2 chains, tried too: 9.7 %);
// the chains split keys (or dimensions), never a sum, so results are the same bits.
template <class V, int NB>
constexpr int kChains = [] {
  int c = NB >= 8 ? 2 : 4;
  while (c > 1 && NB * c + c + 1 > V::kRegs) c /= 2;
  return c;
}();

// Scores of keys [j, j + C W) of a page: C vectors of keys, one chain each. Keys are read in whole
// vectors: a K^T row (and a Q8 cache's row of scales) is a page wide, a multiple of every chunk
// (attention.cpp checks it), so the lanes past n read keys of the page not yet (or no longer) in use,
// whose scores are never stored. A load with a tail inside the loop made GCC keep every AVX2
// accumulator in memory, storing all of them on each step of the loop.
template <class V, int NB, KVElem E, int C>
PE_ATTN_INLINE void scores_chunk(const void* kt, const fp16_t* ks, int64_t ldk, int hd, int n, int j, const float* q,
                                 int64_t ldq, float* s, int64_t lds) {
  using F = typename V::F;
  F acc[NB][C];
  for (int t = 0; t < NB; t++)
    for (int c = 0; c < C; c++) acc[t][c] = V::zero();
  F scale[C];  // Q8: the keys' scales for the current 32 dimensions
  for (int c = 0; c < C; c++) scale[c] = V::zero();
  for (int d = 0; d < hd; d++) {
    if constexpr (E == KVElem::Q8)
      if (d % kQ8Dims == 0)
        for (int c = 0; c < C; c++) scale[c] = V::load_f16(ks + (d / kQ8Dims) * ldk + j + c * V::W, V::W);
    F k[C];
    for (int c = 0; c < C; c++) {
      k[c] = load_kv<V, E>(kt, d * ldk + j + c * V::W, V::W);
      if constexpr (E == KVElem::Q8) k[c] = V::mul(k[c], scale[c]);
    }
    for (int t = 0; t < NB; t++) {
      const F qv = V::set1(q[t * ldq + d]);
      for (int c = 0; c < C; c++) acc[t][c] = V::fmadd(qv, k[c], acc[t][c]);
    }
  }
  for (int c = 0; c < C; c++) {
    const int w = n - j - c * V::W < V::W ? n - j - c * V::W : V::W;
    if (w > 0)
      for (int t = 0; t < NB; t++) V::store(s + t * lds + j + c * V::W, acc[t][c], w);
  }
}

template <class V, int NB, KVElem E, int... CC>
PE_ATTN_INLINE void scores_tail(int cc, const void* kt, const fp16_t* ks, int64_t ldk, int hd, int n, int j,
                                const float* q, int64_t ldq, float* s, int64_t lds, std::integer_sequence<int, CC...>) {
  ((cc == CC + 1 ? scores_chunk<V, NB, E, CC + 1>(kt, ks, ldk, hd, n, j, q, ldq, s, lds) : void()), ...);
}

// Whole chunks of kChains vectors, then the page's last keys with only the vectors they need: a decode
// row's last page is partly filled, and its unused vectors were loads of lines nobody asked for
// (attention.cpp prefetches only the keys in use) and FMAs thrown away. Each key's score is the same
// sum either way (the chains split keys, never a sum).
template <class V, int NB, KVElem E>
void scores_rows(const void* kt, const fp16_t* ks, int64_t ldk, int hd, int n, const float* q, int64_t ldq, float* s,
                 int64_t lds) {
  constexpr int C = kChains<V, NB>;
  int j = 0;
  for (; j + C * V::W <= n; j += C * V::W) scores_chunk<V, NB, E, C>(kt, ks, ldk, hd, n, j, q, ldq, s, lds);
  if (j < n)
    scores_tail<V, NB, E>((n - j + V::W - 1) / V::W, kt, ks, ldk, hd, n, j, q, ldq, s, lds,
                          std::make_integer_sequence<int, C>{});
}

// CC whole vectors of head dims from d (CC <= the chains the registers allow), or, PART, one vector of
// the last hd - d < W dims. Whole vectors are their own loop, with no tail code in it (see
// scores_rows): a head size that is a multiple of W never takes the PART loop. The first key is peeled
// so that the accumulators start from it and o, not from a load of o alone: with that load GCC kept
// the AVX2 accumulators of F16 and Q8 caches in memory through the loop (the same sums either way).
template <class V, int NB, KVElem E, int CC, bool PART>
__attribute__((noinline)) void values_dims(const void* v, const fp16_t* vs, int hd, int n, int d, const float* p,
                                           int64_t ldp, float* o, int64_t ldo) {
  using F = typename V::F;
  if (n <= 0) return;
  const int w = PART ? hd - d : V::W;  // of each vector
  auto value = [&](int j, F (&x)[CC]) {
    F scale = V::zero();  // Q8: the value's scale for the block of dimension d + c * W
    for (int c = 0; c < CC; c++) {
      x[c] = load_kv<V, E>(v, int64_t(j) * hd + d + c * V::W, w);
      if constexpr (E == KVElem::Q8) {
        if (c == 0 || (d + c * V::W) % kQ8Dims == 0)
          scale = V::set1_f16(vs[int64_t(j) * (hd / kQ8Dims) + (d + c * V::W) / kQ8Dims]);
        x[c] = V::mul(x[c], scale);
      }
    }
  };
  F acc[NB][CC];
  {
    F x[CC];
    value(0, x);
    for (int t = 0; t < NB; t++) {
      const F pv = V::set1(p[t * ldp]);
      for (int c = 0; c < CC; c++) acc[t][c] = V::fmadd(pv, x[c], V::load_f32(o + t * ldo + d + c * V::W, w));
    }
  }
  for (int j = 1; j < n; j++) {
    F x[CC];
    value(j, x);
    for (int t = 0; t < NB; t++) {
      const F pv = V::set1(p[t * ldp + j]);
      for (int c = 0; c < CC; c++) acc[t][c] = V::fmadd(pv, x[c], acc[t][c]);
    }
  }
  for (int t = 0; t < NB; t++)
    for (int c = 0; c < CC; c++) V::store(o + t * ldo + d + c * V::W, acc[t][c], w);
}

template <class V, int NB, KVElem E, int... CC>
PE_ATTN_INLINE void values_whole(int cc, const void* v, const fp16_t* vs, int hd, int n, int d, const float* p,
                                 int64_t ldp, float* o, int64_t ldo, std::integer_sequence<int, CC...>) {
  ((cc == CC + 1 ? values_dims<V, NB, E, CC + 1, false>(v, vs, hd, n, d, p, ldp, o, ldo) : void()), ...);
}

template <class V, int NB, KVElem E>
void values_rows(const void* v, const fp16_t* vs, int hd, int n, const float* p, int64_t ldp, float* o,
                 int64_t ldo) {
  constexpr int C = kChains<V, NB>;
  int d = 0;
  for (; d + C * V::W <= hd; d += C * V::W) values_dims<V, NB, E, C, false>(v, vs, hd, n, d, p, ldp, o, ldo);
  if (const int cc = (hd - d) / V::W; cc > 0) {
    values_whole<V, NB, E>(cc, v, vs, hd, n, d, p, ldp, o, ldo, std::make_integer_sequence<int, C>{});
    d += cc * V::W;
  }
  if (d < hd) values_dims<V, NB, E, 1, true>(v, vs, hd, n, d, p, ldp, o, ldo);
}

template <class V, KVElem E, int... T>
void scores_any(const void* kt, const fp16_t* ks, int64_t ldk, int hd, int n, const float* q, int64_t ldq, int nb,
                float* s, int64_t lds, std::integer_sequence<int, T...>) {
  ((nb == T + 1 ? scores_rows<V, T + 1, E>(kt, ks, ldk, hd, n, q, ldq, s, lds) : void()), ...);
}

template <class V, KVElem E, int... T>
void values_any(const void* v, const fp16_t* vs, int hd, int n, const float* p, int64_t ldp, int nb, float* o,
                int64_t ldo, std::integer_sequence<int, T...>) {
  ((nb == T + 1 ? values_rows<V, T + 1, E>(v, vs, hd, n, p, ldp, o, ldo) : void()), ...);
}

template <class V>
void scores(const void* kt, const fp16_t* ks, KVElem e, int64_t ldk, int hd, int n, const float* q, int64_t ldq,
            int nb, float* s, int64_t lds) {
  const auto rows = std::make_integer_sequence<int, kMaxQueryBlock>{};
  switch (e) {
    case KVElem::F32: return scores_any<V, KVElem::F32>(kt, ks, ldk, hd, n, q, ldq, nb, s, lds, rows);
    case KVElem::F16: return scores_any<V, KVElem::F16>(kt, ks, ldk, hd, n, q, ldq, nb, s, lds, rows);
    case KVElem::Q8: return scores_any<V, KVElem::Q8>(kt, ks, ldk, hd, n, q, ldq, nb, s, lds, rows);
  }
}

template <class V>
void values(const void* v, const fp16_t* vs, KVElem e, int hd, int n, const float* p, int64_t ldp, int nb, float* o,
            int64_t ldo) {
  const auto rows = std::make_integer_sequence<int, kMaxQueryBlock>{};
  switch (e) {
    case KVElem::F32: return values_any<V, KVElem::F32>(v, vs, hd, n, p, ldp, nb, o, ldo, rows);
    case KVElem::F16: return values_any<V, KVElem::F16>(v, vs, hd, n, p, ldp, nb, o, ldo, rows);
    case KVElem::Q8: return values_any<V, KVElem::Q8>(v, vs, hd, n, p, ldp, nb, o, ldo, rows);
  }
}

// e^x for x <= 0, as a softmax needs it: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6
// polynomial (relative error ~2 ulp), times 2^n. Arguments below -87.3 return e^-87.3 (~1e-38) instead of
// a denormal or zero: next to the row's largest term, 1, it makes no difference to the sum.
template <class V>
PE_ATTN_INLINE typename V::F exp_nonpositive(typename V::F x) {
  using F = typename V::F;
  x = V::max(x, V::set1(-87.3f));
  const F n = V::round(V::mul(x, V::set1(1.44269504088896341f)));
  F r = V::fmadd(n, V::set1(-0.693359375f), x);  // ln 2 in two parts, so that r is exact
  r = V::fmadd(n, V::set1(2.12194440e-4f), r);
  F p = V::set1(1.9875691500e-4f);
  p = V::fmadd(p, r, V::set1(1.3981999507e-3f));
  p = V::fmadd(p, r, V::set1(8.3334519073e-3f));
  p = V::fmadd(p, r, V::set1(4.1665795894e-2f));
  p = V::fmadd(p, r, V::set1(1.6666665459e-1f));
  p = V::fmadd(p, r, V::set1(5.0000001201e-1f));
  p = V::fmadd(V::mul(p, r), r, V::add(r, V::set1(1.f)));
  return V::scale2(p, n);
}

// The row's sums run in one fixed order for a given n, so decoding and prefill agree bit for bit.
// A row with an infinite or NaN score (corrupt weights) comes out all NaN, so that the layer's
// finiteness check names it: max() and the exp's clamp would otherwise turn NaN into a finite weight,
// and an infinite exponent is undefined behaviour in the portable exp's float-to-int step.
template <class V>
void softmax(float* s, int64_t n, float scale) {
  using F = typename V::F;
  const int64_t full = n - n % V::W;
  const F sc = V::set1(scale);
  F mv = V::set1(-3.4e38f);
  F finite = V::zero();  // x * 0 is 0 for finite x, NaN for inf or NaN
  for (int64_t j = 0; j < full; j += V::W) {
    const F x = V::mul(V::load_f32(s + j, V::W), sc);
    mv = V::max(mv, x);
    finite = V::fmadd(x, V::zero(), finite);
  }
  float mx = V::hmax(mv);
  float nonfinite = V::hsum(finite);
  for (int64_t j = full; j < n; j++) {
    mx = s[j] * scale > mx ? s[j] * scale : mx;
    nonfinite += s[j] * scale * 0.f;
  }
  if (nonfinite != 0.f) {
    for (int64_t j = 0; j < n; j++) s[j] = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  const F shift = V::set1(mx);
  F sum = V::zero();
  for (int64_t j = 0; j < n; j += V::W) {
    const int w = n - j < V::W ? int(n - j) : V::W;
    const F e = exp_nonpositive<V>(V::sub(V::mul(V::load_f32(s + j, w), sc), shift));
    V::store(s + j, e, w);
    sum = V::add(sum, w == V::W ? e : V::load_f32(s + j, w));  // the tail's padding lanes are not summed
  }
  const F inv = V::set1(1.f / V::hsum(sum));
  for (int64_t j = 0; j < n; j += V::W) {
    const int w = n - j < V::W ? int(n - j) : V::W;
    V::store(s + j, V::mul(V::load_f32(s + j, w), inv), w);
  }
}

}  // namespace
}  // namespace pe::cpu
