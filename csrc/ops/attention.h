// Scaled dot-product attention of query rows over keys and values held in a KV cache.
#pragma once
#include <vector>

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
// alibi: null, or one slope per query head (host memory, n_head floats): ALiBi adds
// slope_h * (j - (key_end - 1)) to the score of key j after scaling and soft-capping, i.e. minus the slope
// times the key's distance from the row's last visible key, which in causal attention is the row's own
// position (Baichuan-13B, BLOOM; llama.cpp's ggml_soft_max_ext with max_bias and its -|i - j| mask).
// bias: null, or T5's relative position bias (below), added to the scaled scores.
struct PositionBias;
void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap = 0.f, const float* alibi = nullptr,
               const PositionBias* bias = nullptr);

// Self-attention that first stores the rows' own keys and values k, v (F32 [n x n_kv_head * head_dim])
// at `slots` (I32 [1 x n]) of `layer`, as KVCache::store does, then attends as attention() does. On the
// CPU a decode step (one row per sequence) does both in each work item: a row's store is head_dim
// scattered lines of K^T per KV head, which its attention reads right after, on the same thread.
void store_and_attend(Executor& ex, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& slots, int n_head,
                      KVCache& kv, int layer, const AttentionRows& rows, float scale, const Tensor& out,
                      float softcap = 0.f, const float* alibi = nullptr, const PositionBias* bias = nullptr);

// The keys and values store_and_attend hands to a backend's attention.
struct NewKeys {
  Tensor k, v, slots;
};

// What the attentions of a pass of n_rows rows over `kv` read from the host (a GPU's page table, with
// the ALiBi slopes), uploaded ahead of the pass's first attention so that the pass itself queues no
// host-to-device copy and can be replayed as a CUDA graph (Executor::run_captured). Returns the launch
// choice those attentions make from the host's state (a GPU's split count; 0 on the CPU), which the key
// of a captured pass must include.
int64_t attention_upload(Executor& ex, const KVCache& kv, int64_t n_rows, int n_head, const float* alibi);

// T5's relative position bias (Raffel et al. 2020, 2.1): the score of a row at position i for key j
// gets table[h][bucket(j - i)], one learned scalar per head and bucket, shared by every layer of a
// stack. Distances below n_buckets / 4 (bidirectional; / 2 causal) have a bucket each, longer ones
// share log-spaced buckets up to max_distance; bidirectional buckets tell left from right, causal
// ones see only the past.
struct PositionBias {
  const float* table = nullptr;  // host F32 [n_head x n_buckets]
  int n_buckets = 0;
  int max_distance = 128;        // llama.cpp and transformers' default; T5 checkpoints all use it
  bool bidirectional = false;
  Tensor query_pos;              // I32 [1 x n]: each row's position in its sequence
};

// transformers' T5Attention._relative_position_bucket for one distance (key position - query position),
// in float32 as torch computes it.
int relative_position_bucket(int64_t relative_position, int n_buckets, int max_distance, bool bidirectional);

// ALiBi's slope of each of n_head heads for maximum bias max_bias, as ggml computes them: with
// n = 2^floor(log2(n_head)), head h < n gets 2^(-max_bias (h + 1) / n), head h >= n gets
// 2^(-max_bias (2 (h - n) + 1) / (2 n)). For max_bias 8 these are BLOOM's and Baichuan's
// _get_interleave slopes, non-power-of-two head counts included.
std::vector<float> alibi_slopes(int n_head, float max_bias);

}  // namespace pe
