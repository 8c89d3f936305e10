// Scaled dot-product attention of query rows over keys and values held in a KV cache.
#pragma once
#include "executor.h"
#include "kv_cache.h"
#include "tensor.h"

namespace pe {

// Which keys each query row sees: positions [key_begin, key_end) of its sequence `seq` in the cache
// (causal: [0, pos + 1); inside ChatGLM-6B's bidirectional prefix: [0, prefix_len)). I32 [1 x n] each.
// Rows of one sequence should be consecutive (one batch row per token, in order, as a batch is built):
// the backend then reads each key page once for all of them.
struct AttentionRows {
  Tensor seq, key_begin, key_end;
};

// out = softmax(scale * q K^T) V per row and head, K and V from `layer` of `kv` (the layer's own
// self-attention cache, or a cache holding another stack's keys, as cross-attention will).
// q, out: F32 [n x n_head * head_dim]. Head h reads KV head h / (n_head / n_kv_head) (grouped-query).
// softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) before the softmax (Gemma 2).
void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap = 0.f);

}  // namespace pe
