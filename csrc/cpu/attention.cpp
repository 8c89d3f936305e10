#include "ops/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/vec.h"
#include "ops/matmul.h"

namespace pe {

constexpr int64_t kPrefillTokens = 16;  // query tokens from which attention runs as matrix products

void kv_store(KVLayer& kv, const float* k, const float* v, int64_t stride, int64_t n_tokens, int64_t n_past) {
  PE_CHECK(n_past + n_tokens <= kv.n_ctx, ContextLengthError, "KV cache overflow: ", n_past + n_tokens,
           " positions > n_ctx ", kv.n_ctx);
  const bool f16 = kv.type == GGMLType::F16;
  for (int64_t t = 0; t < n_tokens; t++) {
    for (int h = 0; h < kv.n_kv_head; h++) {
      const int64_t dst = (int64_t(h) * kv.n_ctx + n_past + t) * kv.head_dim;
      const float* ks = k + t * stride + int64_t(h) * kv.head_dim;
      const float* vs = v + t * stride + int64_t(h) * kv.head_dim;
      if (f16) {
        vec_fp32_to_fp16(ks, static_cast<fp16_t*>(kv.k) + dst, kv.head_dim);
        vec_fp32_to_fp16(vs, static_cast<fp16_t*>(kv.v) + dst, kv.head_dim);
      } else {
        std::memcpy(static_cast<float*>(kv.k) + dst, ks, sizeof(float) * kv.head_dim);
        std::memcpy(static_cast<float*>(kv.v) + dst, vs, sizeof(float) * kv.head_dim);
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

// Many query tokens (prefill): per head, scores = Q K^T and out = P V as matrix products with the
// matmul kernels, whose register tiles load each key row once for many queries. One dot product per
// (query, key) pair, as decode does, spends prefill's time reducing 64-element vectors.
void attention_prefill(const float* q, int64_t q_stride, int64_t n_tokens, int n_head, const KVLayer& kv,
                       int64_t n_past, float scale, float* out, int64_t out_stride, ThreadPool& pool,
                       int64_t bidirectional_until) {
  const int hd = kv.head_dim;
  const int group = n_head / kv.n_kv_head;
  const int64_t n_all = n_past + n_tokens;
  const int64_t n_pad = (n_all + 15) / 16 * 16;  // P's rows and V^T's columns, zero past n_all
  const size_t elem = kv.type == GGMLType::F16 ? sizeof(fp16_t) : sizeof(float);
  static thread_local std::vector<float> scores, vt;  // grow-only: no page faults per layer
  if (scores.size() < size_t(n_tokens * n_pad)) scores.resize(size_t(n_tokens * n_pad));
  if (vt.size() < size_t(hd * n_pad)) vt.resize(size_t(hd * n_pad));
  // Plain pointers for the workers: inside their lambdas `scores`/`vt` would name their own thread_locals.
  float* const sc = scores.data();
  float* const vtp = vt.data();

  for (int g = 0; g < kv.n_kv_head; g++) {
    const int64_t head_off = int64_t(g) * kv.n_ctx * hd;
    const auto* k_rows = static_cast<const uint8_t*>(kv.k) + size_t(head_off) * elem;
    // V^T of this KV head as float32, so that out = P V is "P times a weight matrix".
    pool.for_range(hd, 8, [&](int64_t d0, int64_t d1) {
      for (int64_t d = d0; d < d1; d++) {
        float* row = vtp + d * n_pad;
        if (kv.type == GGMLType::F16) {
          const fp16_t* v = static_cast<const fp16_t*>(kv.v) + head_off + d;
          for (int64_t j = 0; j < n_all; j++) row[j] = fp16_to_fp32(v[j * hd]);
        } else {
          const float* v = static_cast<const float*>(kv.v) + head_off + d;
          for (int64_t j = 0; j < n_all; j++) row[j] = v[j * hd];
        }
        std::fill(row + n_all, row + n_pad, 0.0f);
      }
    });
    const WeightView keys{kv.type, k_rows, n_all, hd, hd * elem};
    const WeightView values_t{GGMLType::F32, vtp, hd, n_pad, size_t(n_pad) * sizeof(float)};
    for (int h = g * group; h < (g + 1) * group; h++) {
      matmul(keys, q + int64_t(h) * hd, n_tokens, q_stride, sc, n_pad, pool);
      pool.for_range(n_tokens, 4, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; t++) {
          float* s = sc + t * n_pad;
          const int64_t n_keys = visible_keys(n_past, t, n_all, bidirectional_until);
          float mx = -INFINITY;
          for (int64_t j = 0; j < n_keys; j++) mx = std::max(mx, s[j] * scale);
          double sum = 0;
          for (int64_t j = 0; j < n_keys; j++) {
            s[j] = std::exp(s[j] * scale - mx);
            sum += s[j];
          }
          const float inv = float(1.0 / sum);
          for (int64_t j = 0; j < n_keys; j++) s[j] *= inv;
          std::fill(s + n_keys, s + n_pad, 0.0f);
        }
      });
      matmul(values_t, sc, n_tokens, n_pad, out + int64_t(h) * hd, out_stride, pool);
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
  const int hd = kv.head_dim;
  const int group = n_head / kv.n_kv_head;
  const int64_t n_items = int64_t(n_head) * n_tokens;  // head-major: neighbours share K/V rows
  const int64_t n_all = n_past + n_tokens;
  const bool f16 = kv.type == GGMLType::F16;

  auto work = [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> scores;
    if (int64_t(scores.size()) < n_all) scores.resize(size_t(n_all));
    for (int64_t item = i0; item < i1; item++) {
      const int h = int(item / n_tokens);
      const int64_t t = item % n_tokens;
      const int64_t n_keys = visible_keys(n_past, t, n_all, bidirectional_until);
      const float* qv = q + t * q_stride + int64_t(h) * hd;
      const int64_t head_off = int64_t(h / group) * kv.n_ctx * hd;
      float mx = -INFINITY;
      for (int64_t j = 0; j < n_keys; j++) {
        scores[j] = (f16 ? vec_dot_f16_f32(static_cast<const fp16_t*>(kv.k) + head_off + j * hd, qv, hd)
                         : vec_dot_f32(static_cast<const float*>(kv.k) + head_off + j * hd, qv, hd)) *
                    scale;
        mx = std::max(mx, scores[j]);
      }
      double sum = 0;
      for (int64_t j = 0; j < n_keys; j++) {
        scores[j] = std::exp(scores[j] - mx);
        sum += scores[j];
      }
      const float inv = float(1.0 / sum);
      float* o = out + t * out_stride + int64_t(h) * hd;
      std::memset(o, 0, sizeof(float) * hd);
      for (int64_t j = 0; j < n_keys; j++) {
        if (f16) vec_axpy_f16(o, static_cast<const fp16_t*>(kv.v) + head_off + j * hd, scores[j] * inv, hd);
        else vec_axpy_f32(o, static_cast<const float*>(kv.v) + head_off + j * hd, scores[j] * inv, hd);
      }
    }
  };
  pool.for_range(n_items, 2, work);
}

}  // namespace pe
