// Where K and V of one KV head sit inside a CPU cache page (see cpu/kv_cache.cpp): K transposed,
// K^T [head_dim][kPageSize], then V as it is, [kPageSize][head_dim] (attention_kernels.h says why).
#pragma once
#include "kv_cache.h"

namespace pe::cpu {

struct KVPageLayout {
  explicit KVPageLayout(const KVCache& kv)
      : n_kv_head(kv.n_kv_head()), head_dim(kv.head_dim()), elem(kv.element_size()), type(kv.type()) {}
  int n_kv_head, head_dim;
  size_t elem;
  GGMLType type;

  size_t head_bytes() const { return size_t(head_dim) * size_t(KVCache::kPageSize) * elem; }
  uint8_t* keys_t(uint8_t* page, int h) const { return page + size_t(h) * head_bytes(); }
  uint8_t* values(uint8_t* page, int h) const { return page + size_t(n_kv_head + h) * head_bytes(); }
};

}  // namespace pe::cpu
