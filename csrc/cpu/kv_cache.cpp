// The CPU layout of a KV cache page (one layer's part of it): per KV head, K transposed
// ([head_dim][position]), then per KV head V ([position][head_dim]); see cpu/kv_layout.h.
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/hadamard.h"
#include "cpu/kv_layout.h"
#include "cpu/ops.h"
#include "cpu/quantize.h"
#include "cpu/vec.h"

namespace pe::cpu {

namespace {

// Stores head h of rows [t0, t0 + n) of k and v, whose slots are consecutive within one page from
// offset `off`. K goes in transposed: column `off + i` of K^T gets row t0 + i; written a K^T row (one
// dimension of n consecutive positions) at a time, so that a prefill's rows are a blocked transpose, not
// head_dim scattered stores per row.
template <class T>
void store_run(const KVPageLayout& lay, uint8_t* page, int64_t off, const Tensor& k, const Tensor& v, int64_t t0,
               int64_t n, int h) {
  const int64_t hd = lay.head_dim;
  thread_local std::vector<T> buf;
  buf.resize(size_t(n * hd));
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

// store_run for a Q8_0 cache: K^T's column `off + i` and its scales, V's row `off + i` and its scales,
// of the rotated rows (kv_layout.h).
void store_run_q8(const KVPageLayout& lay, uint8_t* page, int64_t off, const Tensor& k, const Tensor& v, int64_t t0,
                  int64_t n, int h) {
  const int64_t hd = lay.head_dim, P = KVCache::kPageSize, nb = hd / KVCache::kQ8Block;
  thread_local std::vector<float> rotated;
  rotated.resize(size_t(2 * hd));
  float* kr = rotated.data();
  float* vr = kr + hd;
  auto* kt = reinterpret_cast<int8_t*>(lay.keys_t(page, h));
  fp16_t* ks = lay.scales(lay.keys_t(page, h));
  auto* vd = reinterpret_cast<int8_t*>(lay.values(page, h));
  fp16_t* vs = lay.scales(lay.values(page, h));
  for (int64_t i = 0; i < n; i++) {
    std::memcpy(kr, k.row(t0 + i) + int64_t(h) * hd, sizeof(float) * size_t(hd));
    std::memcpy(vr, v.row(t0 + i) + int64_t(h) * hd, sizeof(float) * size_t(hd));
    hadamard_rotate(kr, hd, lay.key_rotation);
    hadamard_rotate(vr, hd, lay.value_rotation);
    for (int64_t b = 0; b < nb; b++) {
      const int64_t d0 = b * KVCache::kQ8Block;
      quantize_block_q8_0(kr + d0, kt + d0 * P + off + i, P, ks + b * P + off + i);
      quantize_block_q8_0(vr + d0, vd + (off + i) * hd + d0, 1, vs + (off + i) * nb + b);
    }
  }
}

}  // namespace

void check_kv_slots(const KVCache& kv, const Tensor& slots_t, int64_t n) {
  const int32_t* slots = static_cast<const int32_t*>(slots_t.data);
  const int64_t n_slots = kv.n_pages() * KVCache::kPageSize;
  for (int64_t t = 0; t < n; t++)
    PE_CHECK(slots[t] >= 0 && slots[t] < n_slots, Error, "kv store: slot ", slots[t], " out of range");
}

void store_head_rows(const KVPageLayout& lay, const KVCache& kv, int layer, const Tensor& k, const Tensor& v,
                     int64_t t0, int64_t n, int32_t slot, int h) {
  uint8_t* page = kv.page_data(layer, slot / int32_t(KVCache::kPageSize));
  const int64_t off = slot % KVCache::kPageSize;
  if (lay.elem == KVElem::F16) store_run<fp16_t>(lay, page, off, k, v, t0, n, h);
  else if (lay.elem == KVElem::F32) store_run<float>(lay, page, off, k, v, t0, n, h);
  else store_run_q8(lay, page, off, k, v, t0, n, h);
}

void store_kv_rows(const KVCache& kv, int layer, const Tensor& k, const Tensor& v, const Tensor& slots_t) {
  check_kv_slots(kv, slots_t, k.rows);
  const KVPageLayout lay(kv);
  const int32_t* slots = static_cast<const int32_t*>(slots_t.data);
  for (int64_t t = 0; t < k.rows;) {
    // The run of rows from t whose slots follow each other inside one page.
    const int64_t off = slots[t] % KVCache::kPageSize;
    int64_t n = 1;
    while (t + n < k.rows && off + n < KVCache::kPageSize && slots[t + n] == slots[t] + n) n++;
    for (int h = 0; h < kv.n_kv_head(); h++) store_head_rows(lay, kv, layer, k, v, t, n, slots[t], h);
    t += n;
  }
}

void kv_store(Executor&, KVCache& kv, int layer, const Tensor& k, const Tensor& v, const Tensor& slots) {
  store_kv_rows(kv, layer, k, v, slots);
}

}  // namespace pe::cpu
