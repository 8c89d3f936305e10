// The CPU layout of a KV cache page (one layer's part of it): per KV head, K transposed
// ([head_dim][position]), then per KV head V ([position][head_dim]); see cpu/attention_kernels.h.
#include <cstring>
#include <vector>

#include "cpu/kv_layout.h"
#include "cpu/ops.h"
#include "cpu/vec.h"

namespace pe::cpu {

void kv_store(Executor&, KVCache& kv, int layer, const Tensor& k, const Tensor& v, const Tensor& slots_t) {
  const KVPageLayout lay(kv);
  const int32_t* slots = static_cast<const int32_t*>(slots_t.data);
  const int64_t n_slots = kv.n_pages() * KVCache::kPageSize;
  const bool f16 = kv.type() == GGMLType::F16;
  std::vector<fp16_t> k16(size_t(lay.head_dim));
  for (int64_t t = 0; t < k.rows; t++) {
    PE_CHECK(slots[t] >= 0 && slots[t] < n_slots, Error, "kv store: slot ", slots[t], " out of range");
    uint8_t* page = kv.page_data(layer, slots[t] / int32_t(KVCache::kPageSize));
    const int64_t off = slots[t] % KVCache::kPageSize;
    for (int h = 0; h < lay.n_kv_head; h++) {
      const float* ks = k.row(t) + int64_t(h) * lay.head_dim;
      const float* vs = v.row(t) + int64_t(h) * lay.head_dim;
      uint8_t* kt = lay.keys_t(page, h) + size_t(off) * lay.elem;  // column `off` of K^T
      uint8_t* vd = lay.values(page, h) + size_t(off * lay.head_dim) * lay.elem;
      if (f16) {
        vec_fp32_to_fp16(ks, k16.data(), lay.head_dim);
        fp16_t* dst = reinterpret_cast<fp16_t*>(kt);
        for (int d = 0; d < lay.head_dim; d++) dst[d * KVCache::kPageSize] = k16[size_t(d)];
        vec_fp32_to_fp16(vs, reinterpret_cast<fp16_t*>(vd), lay.head_dim);
      } else {
        float* dst = reinterpret_cast<float*>(kt);
        for (int d = 0; d < lay.head_dim; d++) dst[d * KVCache::kPageSize] = ks[d];
        std::memcpy(vd, vs, sizeof(float) * size_t(lay.head_dim));
      }
    }
  }
}

}  // namespace pe::cpu
