// attention_kernels.h's two products, written once over a vector-traits type V (F: vector of W floats;
// load/load_f16 with a count for tails, fmadd, set1, store). Included by one file per ISA; everything
// here has internal linkage so each ISA keeps its own copy.
#pragma once
#include <cstdint>
#include <utility>

#include "cpu/attention_kernels.h"
#include "ggml_types.h"

namespace pe::cpu {
namespace {

template <class V>
PE_ATTN_INLINE typename V::F load_any(const void* base, bool f16, int64_t i, int n) {
  return f16 ? V::load_f16(static_cast<const fp16_t*>(base) + i, n) : V::load_f32(static_cast<const float*>(base) + i, n);
}

// Vectors in flight per row: FMA latency needs several independent accumulators when rows are few;
// with many rows the rows provide them (and registers run out).
template <int NB>
constexpr int kChains = NB >= 8 ? 2 : 4;

template <class V, int NB>
void scores_rows(const void* kt, bool f16, int64_t ldk, int hd, int n, const float* q, int64_t ldq, float* s,
                 int64_t lds) {
  using F = typename V::F;
  constexpr int C = kChains<NB>;
  for (int j = 0; j < n; j += C * V::W) {
    int w[C];
    for (int c = 0; c < C; c++) w[c] = n - j - c * V::W < V::W ? n - j - c * V::W : V::W;
    F acc[NB][C];
    for (int t = 0; t < NB; t++)
      for (int c = 0; c < C; c++) acc[t][c] = V::zero();
    for (int d = 0; d < hd; d++) {
      F k[C];
      for (int c = 0; c < C; c++) k[c] = w[c] > 0 ? load_any<V>(kt, f16, d * ldk + j + c * V::W, w[c]) : V::zero();
      for (int t = 0; t < NB; t++) {
        const F qv = V::set1(q[t * ldq + d]);
        for (int c = 0; c < C; c++) acc[t][c] = V::fmadd(qv, k[c], acc[t][c]);
      }
    }
    for (int t = 0; t < NB; t++)
      for (int c = 0; c < C; c++)
        if (w[c] > 0) V::store(s + t * lds + j + c * V::W, acc[t][c], w[c]);
  }
}

template <class V, int NB>
void values_rows(const void* v, bool f16, int hd, int n, const float* p, int64_t ldp, float* o, int64_t ldo) {
  using F = typename V::F;
  constexpr int C = kChains<NB>;
  for (int d = 0; d < hd; d += C * V::W) {
    int w[C];
    for (int c = 0; c < C; c++) w[c] = hd - d - c * V::W < V::W ? hd - d - c * V::W : V::W;
    F acc[NB][C];
    for (int t = 0; t < NB; t++)
      for (int c = 0; c < C; c++) acc[t][c] = w[c] > 0 ? V::load_f32(o + t * ldo + d + c * V::W, w[c]) : V::zero();
    for (int j = 0; j < n; j++) {
      F x[C];
      for (int c = 0; c < C; c++)
        x[c] = w[c] > 0 ? load_any<V>(v, f16, int64_t(j) * hd + d + c * V::W, w[c]) : V::zero();
      for (int t = 0; t < NB; t++) {
        const F pv = V::set1(p[t * ldp + j]);
        for (int c = 0; c < C; c++) acc[t][c] = V::fmadd(pv, x[c], acc[t][c]);
      }
    }
    for (int t = 0; t < NB; t++)
      for (int c = 0; c < C; c++)
        if (w[c] > 0) V::store(o + t * ldo + d + c * V::W, acc[t][c], w[c]);
  }
}

template <class V, int... T>
void scores_any(const void* kt, bool f16, int64_t ldk, int hd, int n, const float* q, int64_t ldq, int nb, float* s,
                int64_t lds, std::integer_sequence<int, T...>) {
  ((nb == T + 1 ? scores_rows<V, T + 1>(kt, f16, ldk, hd, n, q, ldq, s, lds) : void()), ...);
}

template <class V, int... T>
void values_any(const void* v, bool f16, int hd, int n, const float* p, int64_t ldp, int nb, float* o, int64_t ldo,
                std::integer_sequence<int, T...>) {
  ((nb == T + 1 ? values_rows<V, T + 1>(v, f16, hd, n, p, ldp, o, ldo) : void()), ...);
}

template <class V>
void scores(const void* kt, bool f16, int64_t ldk, int hd, int n, const float* q, int64_t ldq, int nb, float* s,
            int64_t lds) {
  scores_any<V>(kt, f16, ldk, hd, n, q, ldq, nb, s, lds, std::make_integer_sequence<int, kMaxQueryBlock>{});
}

template <class V>
void values(const void* v, bool f16, int hd, int n, const float* p, int64_t ldp, int nb, float* o, int64_t ldo) {
  values_any<V>(v, f16, hd, n, p, ldp, nb, o, ldo, std::make_integer_sequence<int, kMaxQueryBlock>{});
}

}  // namespace
}  // namespace pe::cpu
