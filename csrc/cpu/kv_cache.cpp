// The CPU layout of a KV cache page (one layer's part of it): per KV head, K transposed
// ([head_dim][position]), then per KV head V ([position][head_dim]); see cpu/attention_kernels.h.
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/kv_layout.h"
#include "cpu/ops.h"
#include "cpu/vec.h"

namespace pe::cpu {

namespace {

// Stores rows [t0, t0 + n) of k and v, whose slots are consecutive within one page from offset `off`.
// K goes in transposed: column `off + i` of K^T gets row t0 + i; written a K^T row (one dimension of n
// consecutive positions) at a time, so that a prefill's rows are a blocked transpose, not head_dim
// scattered stores per row.
template <class T>
void store_run(const KVPageLayout& lay, uint8_t* page, int64_t off, const Tensor& k, const Tensor& v, int64_t t0,
               int64_t n, std::vector<T>& buf) {
  const int64_t hd = lay.head_dim;
  buf.resize(size_t(n * hd));
  for (int h = 0; h < lay.n_kv_head; h++) {
    // The run's keys of head h as T, [n][hd] (a copy, or the fp16 conversion).
    for (int64_t i = 0; i < n; i++) {
      const float* ks = k.row(t0 + i) + int64_t(h) * hd;
      if constexpr (std::is_same_v<T, fp16_t>) vec_fp32_to_fp16(ks, buf.data() + i * hd, hd);
      else std::memcpy(buf.data() + i * hd, ks, sizeof(float) * size_t(hd));
    }
    T* kt = reinterpret_cast<T*>(lay.keys_t(page, h)) + off;
    for (int64_t d = 0; d < hd; d++)
      for (int64_t i = 0; i < n; i++) kt[d * KVCache::kPageSize + i] = buf[size_t(i * hd + d)];
    T* vd = reinterpret_cast<T*>(lay.values(page, h)) + off * hd;
    for (int64_t i = 0; i < n; i++) {
      const float* vs = v.row(t0 + i) + int64_t(h) * hd;
      if constexpr (std::is_same_v<T, fp16_t>) vec_fp32_to_fp16(vs, vd + i * hd, hd);
      else std::memcpy(vd + i * hd, vs, sizeof(float) * size_t(hd));
    }
  }
}

}  // namespace

void kv_store(Executor&, KVCache& kv, int layer, const Tensor& k, const Tensor& v, const Tensor& slots_t) {
  const KVPageLayout lay(kv);
  const int32_t* slots = static_cast<const int32_t*>(slots_t.data);
  const int64_t n_slots = kv.n_pages() * KVCache::kPageSize;
  for (int64_t t = 0; t < k.rows; t++)
    PE_CHECK(slots[t] >= 0 && slots[t] < n_slots, Error, "kv store: slot ", slots[t], " out of range");
  thread_local std::vector<fp16_t> buf16;
  thread_local std::vector<float> buf32;
  for (int64_t t = 0; t < k.rows;) {
    // The run of rows from t whose slots follow each other inside one page.
    const int32_t page = slots[t] / int32_t(KVCache::kPageSize);
    const int64_t off = slots[t] % KVCache::kPageSize;
    int64_t n = 1;
    while (t + n < k.rows && off + n < KVCache::kPageSize && slots[t + n] == slots[t] + n) n++;
    uint8_t* data = kv.page_data(layer, page);
    if (kv.type() == GGMLType::F16) store_run<fp16_t>(lay, data, off, k, v, t, n, buf16);
    else store_run<float>(lay, data, off, k, v, t, n, buf32);
    t += n;
  }
}

}  // namespace pe::cpu
