#include "ops/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/vec.h"
#include "ops/matmul.h"

namespace pe {

constexpr int64_t kPrefillTokens = 16;  // query tokens from which a head's work is split over the pool

void kv_store(KVLayer& kv, const float* k, const float* v, int64_t stride, int64_t n_tokens, int64_t n_past) {
  PE_CHECK(n_past + n_tokens <= kv.n_ctx, ContextLengthError, "KV cache overflow: ", n_past + n_tokens,
           " positions > n_ctx ", kv.n_ctx);
  const bool f16 = kv.type == GGMLType::F16;
  std::vector<fp16_t> v16(size_t(kv.head_dim));
  for (int64_t t = 0; t < n_tokens; t++) {
    for (int h = 0; h < kv.n_kv_head; h++) {
      const int64_t k_dst = (int64_t(h) * kv.n_ctx + n_past + t) * kv.head_dim;
      const int64_t v_dst = int64_t(h) * kv.head_dim * kv.n_ctx + n_past + t;  // column n_past + t of V^T
      const float* ks = k + t * stride + int64_t(h) * kv.head_dim;
      const float* vs = v + t * stride + int64_t(h) * kv.head_dim;
      if (f16) {
        vec_fp32_to_fp16(ks, static_cast<fp16_t*>(kv.k) + k_dst, kv.head_dim);
        vec_fp32_to_fp16(vs, v16.data(), kv.head_dim);
        fp16_t* vt = static_cast<fp16_t*>(kv.v) + v_dst;
        for (int d = 0; d < kv.head_dim; d++) vt[d * kv.n_ctx] = v16[size_t(d)];
      } else {
        std::memcpy(static_cast<float*>(kv.k) + k_dst, ks, sizeof(float) * kv.head_dim);
        float* vt = static_cast<float*>(kv.v) + v_dst;
        for (int d = 0; d < kv.head_dim; d++) vt[d * kv.n_ctx] = vs[d];
      }
    }
  }
}

namespace {

// Keys query token t (at position n_past + t) may see: causal, or the whole prefix while inside it.
inline int64_t visible_keys(int64_t n_past, int64_t t, int64_t n_all, int64_t bidirectional_until) {
  const int64_t pos = n_past + t;
  return pos < bidirectional_until ? std::min(n_all, bidirectional_until) : pos + 1;
}

// p[0..n) = softmax(scale * s[0..n)), in place.
void softmax(float* s, int64_t n, float scale) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < n; j++) mx = std::max(mx, s[j] * scale);
  double sum = 0;
  for (int64_t j = 0; j < n; j++) {
    s[j] = std::exp(s[j] * scale - mx);
    sum += s[j];
  }
  const float inv = float(1.0 / sum);
  for (int64_t j = 0; j < n; j++) s[j] *= inv;
}

// Keys and values of KV head g over its first n keys, as matmul weights: K is [n][head_dim];
// V is kept transposed, [head_dim][n_ctx], so that P V is "P times a weight matrix" too.
WeightView keys_view(const KVLayer& kv, int g, int64_t n) {
  const size_t elem = kv.type == GGMLType::F16 ? sizeof(fp16_t) : sizeof(float);
  const auto* base = static_cast<const uint8_t*>(kv.k) + size_t(int64_t(g) * kv.n_ctx * kv.head_dim) * elem;
  return {kv.type, base, n, kv.head_dim, size_t(kv.head_dim) * elem};
}
WeightView values_t_view(const KVLayer& kv, int g, int64_t n) {
  const size_t elem = kv.type == GGMLType::F16 ? sizeof(fp16_t) : sizeof(float);
  const auto* base = static_cast<const uint8_t*>(kv.v) + size_t(int64_t(g) * kv.head_dim * kv.n_ctx) * elem;
  return {kv.type, base, kv.head_dim, n, size_t(kv.n_ctx) * elem};
}

// Many query tokens (prefill): per head, scores = Q K^T and out = P V as matrix products whose
// register tiles load each key once for many queries, each split over the pool.
void attention_prefill(const float* q, int64_t q_stride, int64_t n_tokens, int n_head, const KVLayer& kv,
                       int64_t n_past, float scale, float* out, int64_t out_stride, ThreadPool& pool,
                       int64_t bidirectional_until) {
  const int hd = kv.head_dim;
  const int group = n_head / kv.n_kv_head;
  const int64_t n_all = n_past + n_tokens;
  static thread_local std::vector<float> scores;  // grow-only: no page faults per layer
  if (scores.size() < size_t(n_tokens * n_all)) scores.resize(size_t(n_tokens * n_all));
  float* const sc = scores.data();  // the workers' lambdas would name their own thread_local
  for (int g = 0; g < kv.n_kv_head; g++) {
    const WeightView keys = keys_view(kv, g, n_all), values_t = values_t_view(kv, g, n_all);
    for (int h = g * group; h < (g + 1) * group; h++) {
      matmul(keys, q + int64_t(h) * hd, n_tokens, q_stride, sc, n_all, pool);
      pool.for_range(n_tokens, 4, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) {
          float* s = sc + t * n_all;
          const int64_t n_keys = visible_keys(n_past, t, n_all, bidirectional_until);
          softmax(s, n_keys, scale);
          std::fill(s + n_keys, s + n_all, 0.0f);
        }
      });
      matmul(values_t, sc, n_tokens, n_all, out + int64_t(h) * hd, out_stride, pool);
    }
  }
}

}  // namespace

void attention(const float* q, int64_t q_stride, int64_t n_tokens, int n_head, const KVLayer& kv, int64_t n_past,
               float scale, float* out, int64_t out_stride, ThreadPool& pool, int64_t bidirectional_until) {
  if (n_tokens >= kPrefillTokens) {
    attention_prefill(q, q_stride, n_tokens, n_head, kv, n_past, scale, out, out_stride, pool, bidirectional_until);
    return;
  }
  // Few query tokens (decode): one (token, head) pair per work item, each two serial products over
  // the keys it sees.
  const int hd = kv.head_dim;
  const int group = n_head / kv.n_kv_head;
  const int64_t n_all = n_past + n_tokens;
  pool.for_range(int64_t(n_head) * n_tokens, 2, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scores;
    if (int64_t(scores.size()) < n_all) scores.resize(size_t(n_all));
    for (int64_t item = i0; item < i1; item++) {
      const int h = int(item / n_tokens);
      const int64_t t = item % n_tokens;
      const int64_t n_keys = visible_keys(n_past, t, n_all, bidirectional_until);
      matmul_float_serial(keys_view(kv, h / group, n_keys), q + t * q_stride + int64_t(h) * hd, 1, hd,
                          scores.data(), n_keys);
      softmax(scores.data(), n_keys, scale);
      matmul_float_serial(values_t_view(kv, h / group, n_keys), scores.data(), 1, n_keys,
                          out + t * out_stride + int64_t(h) * hd, hd);
    }
  });
}

}  // namespace pe
