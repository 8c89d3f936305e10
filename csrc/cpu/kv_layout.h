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
      : n_kv_head(kv.n_kv_head()), head_dim(kv.head_dim()), type(kv.type()),
        elem(type == GGMLType::F16 ? KVElem::F16 : type == GGMLType::F32 ? KVElem::F32 : KVElem::Q8),
        bytes(KVCache::head_page_bytes(type, head_dim)) {}
  int n_kv_head, head_dim;
  GGMLType type;
  KVElem elem;
  size_t bytes;  // of one head's K (or V) block

  size_t head_bytes() const { return bytes; }
  uint8_t* keys_t(uint8_t* page, int h) const { return page + size_t(h) * bytes; }
  uint8_t* values(uint8_t* page, int h) const { return page + size_t(n_kv_head + h) * bytes; }
  // Q8_0 caches hold H k and H v (cpu/hadamard.h) as llama.cpp's do: the block sizes of the rotations,
  // 0 for none. Keys: the largest power of two >= 64 that divides head_dim; values: 64. Neither when
  // head_dim is not a multiple of 64.
  int key_rotation() const {
    if (elem != KVElem::Q8 || head_dim % 64 != 0) return 0;
    int n = 64;
    while (head_dim % (2 * n) == 0) n *= 2;
    return n;
  }
  int value_rotation() const { return elem == KVElem::Q8 && head_dim % 64 == 0 ? 64 : 0; }
  // A Q8_0 block's scales, after its head_dim x kPageSize int8 values (nullptr for float types).
  fp16_t* scales(uint8_t* block) const {
    return elem == KVElem::Q8 ? reinterpret_cast<fp16_t*>(block + size_t(head_dim) * size_t(KVCache::kPageSize))
                              : nullptr;
  }
};

}  // namespace pe::cpu
