// The CUDA backend: one implementation per op (csrc/ops/<op>.h says what each computes), called by
// the device-neutral op files after their argument checks. Every tensor, including the I32 row
// metadata, is in device memory; work is queued on the executor's stream and nothing here waits
// for the GPU (a copy back to the host does).
#pragma once
#include "executor.h"
#include "kv_cache.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "ops/top_logits.h"
#include "tensor.h"

namespace pe::cuda {

// The GPU kernels round x as MatmulRounding::Int8 whatever `rounding` asks (Bf16 is an AMX option).
void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y, MatmulRounding rounding);
bool matmul_supports(GGMLType t);

// residual: empty, or added to x first (ops/norm.h's add_norm).
void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& residual, const Tensor& w, const Tensor& b,
          const Tensor& y, float eps);
void norm_heads(Executor& ex, const Tensor& x, int n_heads, const Tensor& w, float eps);
void top_logits(Executor& ex, const Tensor& logits, const Tensor& k, const Tensor& inv_t, const Tensor& ids,
                const Tensor& values, const Tensor& stats);
void rope(Executor& ex, const Tensor& x, int n_heads, int head_dim, int first_dim, const Tensor& pos,
          const RopeParams& p);
void gated_activation(Executor& ex, Activation act, const Tensor& gate, const Tensor& up, const Tensor& out);
void activation(Executor& ex, Activation act, const Tensor& x);
void add(Executor& ex, const Tensor& x, const Tensor& y);
void add_bias(Executor& ex, const Tensor& y, const Tensor& b);
void scale(Executor& ex, const Tensor& x, float alpha, const Tensor& y);
void softcap(Executor& ex, const Tensor& x, float cap);
void get_rows(Executor& ex, const Tensor& table, const Tensor& ids, const Tensor& out);
void moe_combine(Executor& ex, const Tensor& y, const Tensor& slot, const Tensor& weight, int64_t k,
                 const Tensor& out);
void kv_store(Executor& ex, KVCache& kv, int layer, const Tensor& k, const Tensor& v, const Tensor& slots);
void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap, const float* alibi, const PositionBias* bias);
int64_t attention_upload(Executor& ex, const KVCache& kv, int64_t n_rows, int n_head, const float* alibi);

}  // namespace pe::cuda
