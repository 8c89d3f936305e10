// The CUDA layout of a KV cache page, and the store that writes it.
//
// One layer's part of a page (KVCache::page_data(layer, page), device memory) is a K block then a V
// block, each [n_kv_head][kPageSize][head_dim] elements of the cache type (IEEE half for F16, or
// float): element (h, p, d) of K at byte offset ((h * kPageSize + p) * head_dim + d) * elem, of V at
// the same offset plus n_kv_head * kPageSize * head_dim * elem. Both are position-major, unlike the
// CPU's transposed K: a warp reads one key's head_dim contiguous elements (cuda/attention.cu).
// Slot = page * kPageSize + position within the page.
#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace pe::cuda {

namespace {

constexpr int kStoreThreads = 256;

// grid (row t, group of kStoreThreads elements): one element of K and one of V per thread, so the
// loads of a row are all in flight at once (a loop over the row's elements in one block of 128
// threads took ~12 us per 7B layer at decode, bound by load latency). A slot outside the cache
// (a padding row) is skipped.
template <typename T>
__global__ void kv_store_kernel(uint8_t* layer_base, size_t page_bytes, int64_t n_slots, int n_kv_head,
                                int head_dim, const float* k, int64_t ldk, const float* v, int64_t ldv,
                                const int32_t* slots) {
  const int64_t t = blockIdx.x;
  const int32_t slot = slots[t];
  if (slot < 0 || int64_t(slot) >= n_slots) return;
  const int64_t page = slot / int32_t(KVCache::kPageSize), pos = slot % int32_t(KVCache::kPageSize);
  T* kp = reinterpret_cast<T*>(layer_base + size_t(page) * page_bytes);
  T* vp = kp + size_t(n_kv_head) * size_t(KVCache::kPageSize) * size_t(head_dim);
  const float* kr = k + t * ldk;
  const float* vr = v + t * ldv;
  const int kv_dim = n_kv_head * head_dim;
  const int e = int(blockIdx.y) * kStoreThreads + int(threadIdx.x);
  if (e < kv_dim) {
    const int h = e / head_dim, d = e % head_dim;
    const size_t off = (size_t(h) * size_t(KVCache::kPageSize) + size_t(pos)) * size_t(head_dim) + size_t(d);
    if constexpr (sizeof(T) == 2) {
      kp[off] = __float2half_rn(kr[e]);
      vp[off] = __float2half_rn(vr[e]);
    } else {
      kp[off] = kr[e];
      vp[off] = vr[e];
    }
  }
}

}  // namespace

void kv_store(Executor& ex, KVCache& kv, int layer, const Tensor& k, const Tensor& v, const Tensor& slots) {
  const int64_t n = k.rows;
  if (n == 0) return;
  PE_CHECK(n <= INT32_MAX, Error, "kv store: ", n, " rows are too many for one launch");
  const size_t elem = kv.element_size();
  const size_t page_bytes = 2 * size_t(kv.n_kv_head()) * size_t(KVCache::kPageSize) * size_t(kv.head_dim()) * elem;
  PE_CHECK(size_t(kv.page_data(layer, 1) - kv.page_data(layer, 0)) == page_bytes, Error,
           "kv store: the cache's page size disagrees with the CUDA page layout");
  PE_CHECK(k.row_stride % sizeof(float) == 0 && v.row_stride % sizeof(float) == 0, Error,
           "kv store: row strides must be whole floats");
  const int64_t n_slots = kv.n_pages() * KVCache::kPageSize;
  const int64_t groups = ceil_div(int64_t(kv.n_kv_head()) * kv.head_dim(), kStoreThreads);
  PE_CHECK(groups <= 65535, Error, "kv store: ", kv.n_kv_head(), " x ", kv.head_dim(),
           " values per row are too many");
  const dim3 grid{unsigned(n), unsigned(groups)};
  const auto* slot_ids = static_cast<const int32_t*>(slots.data);
  const auto* kd = static_cast<const float*>(k.data);
  const auto* vd = static_cast<const float*>(v.data);
  if (kv.type() == GGMLType::F16)
    kv_store_kernel<__half><<<grid, kStoreThreads, 0, stream_of(ex)>>>(
        kv.page_data(layer, 0), page_bytes, n_slots, kv.n_kv_head(), kv.head_dim(), kd, k.ld(), vd, v.ld(), slot_ids);
  else
    kv_store_kernel<float><<<grid, kStoreThreads, 0, stream_of(ex)>>>(
        kv.page_data(layer, 0), page_bytes, n_slots, kv.n_kv_head(), kv.head_dim(), kd, k.ld(), vd, v.ld(), slot_ids);
  PE_CUDA_LAUNCHED();
}

}  // namespace pe::cuda
