// Scaled dot-product attention of a chunk of query tokens over a layer's KV cache.
#pragma once
#include <cstdint>

#include "ggml_types.h"
#include "threadpool.h"

namespace pe {

// One layer's cache: k[h][pos][head_dim] and, transposed, v[h][head_dim][pos], n_ctx positions per
// head, in F16 (the default, half the memory) or F32 (exact; for tests and long-context accuracy).
// Both are then plain matrices for the matmul kernels: scores = K q and out = V^T p.
struct KVLayer {
  void* k;
  void* v;
  GGMLType type;  // F16 or F32
  int n_kv_head;
  int head_dim;
  int64_t n_ctx;
};

// q: n_tokens rows `q_stride` floats apart, n_head heads each. Query token t sits at position
// n_past + t and attends to positions [0, n_past + t] (causal), or to all of [0, n_past + n_tokens)
// when it is before `bidirectional_until` (ChatGLM-6B's prefix). Head h reads KV head
// h / (n_head / n_kv_head) (grouped-query attention). out: n_tokens rows `out_stride` apart.
void attention(const float* q, int64_t q_stride, int64_t n_tokens, int n_head, const KVLayer& kv, int64_t n_past,
               float scale, float* out, int64_t out_stride, ThreadPool& pool, int64_t bidirectional_until = 0);

// Store n_tokens rows of K and V (n_kv_head * head_dim floats each, `stride` apart) at positions
// n_past.. of the cache, converting to the cache type.
void kv_store(KVLayer& kv, const float* k, const float* v, int64_t stride, int64_t n_tokens, int64_t n_past);

}  // namespace pe
