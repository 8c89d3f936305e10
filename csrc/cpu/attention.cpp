#include "ops/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/vec.h"

namespace pe {

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

void attention(const float* q, int64_t q_stride, int64_t n_tokens, int n_head, const KVLayer& kv, int64_t n_past,
               float scale, float* out, int64_t out_stride, ThreadPool& pool, int64_t bidirectional_until) {
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
      const int64_t pos = n_past + t;
      const int64_t n_keys = pos < bidirectional_until ? std::min(n_all, bidirectional_until) : pos + 1;
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
