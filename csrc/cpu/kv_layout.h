// Where K and V of one KV head sit inside a CPU cache page (see cpu/kv_cache.cpp), and the page's
// blocks as float-matmul weight views.
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
  uint8_t* keys(uint8_t* page, int h) const { return page + size_t(h) * head_bytes(); }
  uint8_t* values_t(uint8_t* page, int h) const { return page + size_t(n_kv_head + h) * head_bytes(); }

  // The first n keys of head h: [n x head_dim].
  Tensor keys_view(uint8_t* page, int h, int64_t n) const {
    return Tensor{type, keys(page, h), n, head_dim, size_t(head_dim) * elem};
  }
  // V^T of head h over the first n positions: [head_dim x n], rows a page apart.
  Tensor values_t_view(uint8_t* page, int h, int64_t n) const {
    return Tensor{type, values_t(page, h), head_dim, n, size_t(KVCache::kPageSize) * elem};
  }
};

}  // namespace pe::cpu
