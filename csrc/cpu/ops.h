// The CPU backend: one implementation per op (csrc/ops/<op>.h says what each computes). Called by
// the device-neutral op files after their argument checks; SIMD variants are chosen inside, by
// cpu_path(). Row metadata tensors (I32) are host arrays here.
#pragma once
#include "executor.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "ops/top_logits.h"
#include "tensor.h"

namespace pe::cpu {

void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y, MatmulRounding rounding);
// ys[i] = x ws[i]^T for n weights of one type: x quantized once, all their rows in one hand-off.
void matmul_group(Executor& ex, const Tensor* ws, const Tensor* ys, int n, const Tensor& x,
                  MatmulRounding rounding = MatmulRounding::Int8);
bool matmul_supports(GGMLType t);
// out[0..w.cols) = row r of w as float32.
void dequantize_row(const Tensor& w, int64_t r, float* out);

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
// store: the rows' own keys and values to put in the cache first (store_and_attend), or null.
void attention(Executor& ex, const Tensor& q, int n_head, const KVCache& kv, int layer, const AttentionRows& rows,
               float scale, const Tensor& out, float softcap, const float* alibi, const PositionBias* bias,
               const NewKeys* store = nullptr);
// The CPU's attention reads the cache's pages in place: nothing to upload.
inline int64_t attention_upload(Executor&, const KVCache&, int64_t, int, const float*) { return 0; }

}  // namespace pe::cpu
