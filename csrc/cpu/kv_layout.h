// Where K and V of one KV head sit inside a CPU cache page (see cpu/kv_cache.cpp): K transposed,
// K^T [head_dim][kPageSize], then V as it is, [kPageSize][head_dim] (attention_kernels.h says why).
// A Q8_0 cache follows each block of int8 values with its fp16 scales: K's [head_dim / 32][kPageSize]
// (one per 32 dimensions of a position, laid out like K^T's rows), V's [kPageSize][head_dim / 32]; what
// it holds are rotated keys and values (key_rotation below).
#pragma once
#include "cpu/attention_kernels.h"
#include "kv_cache.h"

namespace pe::cpu {

static_assert(kQ8Dims == KVCache::kQ8Block, "the attention kernels' Q8 block is the cache's");

struct KVPageLayout {
  explicit KVPageLayout(const KVCache& kv)
      : n_kv_head(kv.n_kv_head()), head_dim(kv.head_dim()),
        elem(kv.type() == GGMLType::F16 ? KVElem::F16 : kv.type() == GGMLType::F32 ? KVElem::F32 : KVElem::Q8),
        head_bytes(KVCache::head_page_bytes(kv.type(), head_dim)),
        key_rotation(elem == KVElem::Q8 ? largest_rotation(head_dim) : 0),
        value_rotation(key_rotation ? 64 : 0) {}
  int n_kv_head, head_dim;
  KVElem elem;
  size_t head_bytes;  // of one head's K (or V) block
  // Q8_0 caches hold H k and H v (cpu/hadamard.h) as llama.cpp's do: the block sizes of the rotations,
  // 0 for none. Keys: the largest power of two >= 64 that divides head_dim; values: 64. Neither when
  // head_dim is not a multiple of 64.
  int key_rotation, value_rotation;

  // Bytes of one stored value (a Q8_0 cache's scales aside).
  int64_t elem_bytes() const { return elem == KVElem::F32 ? 4 : elem == KVElem::F16 ? 2 : 1; }
  uint8_t* keys_t(uint8_t* page, int h) const { return page + size_t(h) * head_bytes; }
  uint8_t* values(uint8_t* page, int h) const { return page + size_t(n_kv_head + h) * head_bytes; }
  // A Q8_0 block's scales, after its head_dim x kPageSize int8 values (nullptr for float types).
  fp16_t* scales(uint8_t* block) const {
    return elem == KVElem::Q8 ? reinterpret_cast<fp16_t*>(block + size_t(head_dim) * size_t(KVCache::kPageSize))
                              : nullptr;
  }

 private:
  static int largest_rotation(int hd) {
    if (hd % 64 != 0) return 0;
    int n = 64;
    while (hd % (2 * n) == 0) n *= 2;
    return n;
  }
};

// Stores rows of k and v (F32 [n x n_kv_head * head_dim]) in a CPU cache (cpu/kv_cache.cpp), writing
// through the pages' pointers: at `slots` (I32 [1 x k.rows], checked in range); or head h of rows
// [t0, t0 + n), whose slots are slot, slot + 1, ... inside one page.
void check_kv_slots(const KVCache& kv, const Tensor& slots, int64_t n);
void store_kv_rows(const KVCache& kv, int layer, const Tensor& k, const Tensor& v, const Tensor& slots);
void store_head_rows(const KVPageLayout& lay, const KVCache& kv, int layer, const Tensor& k, const Tensor& v,
                     int64_t t0, int64_t n, int32_t slot, int h);

}  // namespace pe::cpu
