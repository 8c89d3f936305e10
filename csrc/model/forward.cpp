// The math of each family, in order, with the paper's names (STYLE.md: llama2.c's forward()). Every
// step is an op on tensors (csrc/ops/), so this file is the same on every backend.
#include "model/forward.h"

#include <cmath>

#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/norm.h"
#include "ops/rope.h"

namespace pe {

void RowPlan::clear() {
  for (auto* v : {&token, &seq, &rope_pos, &rope_pos2, &key_begin, &key_end, &slot, &logit_rows}) v->clear();
}

void Activations::reserve(const ModelConfig& c, int64_t rows, Device device) {
  const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
  const size_t f = sizeof(float) * size_t(rows);
  for (Buffer* b : {&x, &xn, &qkv, &att, &ff_a, &ff_b})
    if (b->device() != device) *b = Buffer(device, 0);
  x.reserve(f * size_t(c.n_embd));
  xn.reserve(f * size_t(c.n_embd));
  qkv.reserve(f * size_t(q_dim + 2 * kv_dim));
  att.reserve(f * size_t(q_dim));
  ff_a.reserve(f * size_t(2 * c.n_ff));
  ff_b.reserve(f * size_t(c.n_ff));
}

void forward_decoder(Executor& ex, const Model& M, KVCache& kv, const RowPlan& rows, Activations& a,
                     const Tensor& logits, bool hidden_out) {
  const ModelConfig& c = M.config();
  const ArchSpec& spec = c.spec;
  const Device dev = ex.device();
  const int64_t n = rows.size(), d = c.n_embd, hd = c.head_dim, n_ff = c.n_ff;
  const int64_t q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd, qkv_w = q_dim + 2 * kv_dim;
  auto f32 = [&](Buffer& b, int64_t cols) { return f32_tensor(static_cast<float*>(b.data()), n, cols, cols, dev); };
  const Tensor x = f32(a.x, d), xn = f32(a.xn, d), qkv = f32(a.qkv, qkv_w), att = f32(a.att, q_dim);
  const Tensor q = qkv.cols_view(0, q_dim), k = qkv.cols_view(q_dim, kv_dim), v = qkv.cols_view(q_dim + kv_dim, kv_dim);
  // FFN hidden: [gate | up] side by side when ffn_up holds both (ChatGLM2+), else gate in ff_a, up in ff_b.
  const Tensor ff_a = f32(a.ff_a, spec.fused_gate_up ? 2 * n_ff : n_ff), ff_b = f32(a.ff_b, n_ff);
  const Tensor hidden = ff_a.cols_view(0, n_ff);
  const AttentionRows attn_rows{RowPlan::i32(rows.seq), RowPlan::i32(rows.key_begin), RowPlan::i32(rows.key_end)};
  const float kq_scale = 1.0f / std::sqrt(float(hd));

  // Pre-norm of the residual stream x into xn; ChatGLM-6B restarts the stream from it, times alpha.
  auto pre_norm = [&](const Vec& w, const Vec& b) {
    norm(ex, spec.norm, x, tensor_of(w), tensor_of(b), xn, c.norm_eps);
    if (spec.residual_from_norm) scale(ex, xn, c.residual_scale, x);
  };
  auto linear = [&](const Linear& L, const Tensor& in, const Tensor& out) {
    matmul(ex, L.w, in, out);
    if (!L.b.empty()) add_bias(ex, out, tensor_of(L.b));
  };
  auto rotate = [&](const Tensor& heads, int n_heads) {
    rope(ex, heads, n_heads, int(hd), 0, RowPlan::i32(rows.rope_pos), c.rope);
    if (spec.positions == Positions::Rope2D)
      rope(ex, heads, n_heads, int(hd), c.rope.n_dims, RowPlan::i32(rows.rope_pos2), c.rope);
  };

  get_rows(ex, M.tok_embd, RowPlan::i32(rows.token), x);
  for (int64_t l = 0; l < c.n_layer; l++) {
    const Layer& L = M.decoder.layers[size_t(l)];
    // Attention block.
    pre_norm(L.attn_norm, L.attn_norm_b);
    if (L.wqkv.present()) {
      linear(L.wqkv, xn, qkv);
    } else {
      linear(L.wq, xn, q);
      linear(L.wk, xn, k);
      linear(L.wv, xn, v);
    }
    rotate(q, int(c.n_head));
    rotate(k, int(c.n_head_kv));
    kv.store(ex, int(l), k, v, RowPlan::i32(rows.slot));
    attention(ex, q, int(c.n_head), kv, int(l), attn_rows, kq_scale, att);
    linear(L.wo, att, xn);
    add(ex, x, xn);
    // Feed-forward block.
    pre_norm(L.ffn_norm, L.ffn_norm_b);
    if (spec.fused_gate_up) {
      linear(L.w_up, xn, ff_a);
      gated_activation(ex, spec.act, hidden, ff_a.cols_view(n_ff, n_ff), hidden);
    } else if (spec.gated_ffn) {
      linear(L.w_gate, xn, hidden);
      linear(L.w_up, xn, ff_b);
      gated_activation(ex, spec.act, hidden, ff_b, hidden);
    } else {
      linear(L.w_up, xn, hidden);
      activation(ex, spec.act, hidden);
    }
    linear(L.w_down, hidden, xn);
    add(ex, x, xn);
  }

  // LM head (or the hidden states), on the rows whose output is wanted only.
  if (logits.empty() || rows.logit_rows.empty()) return;
  const Tensor h = hidden_out ? logits : xn.rows_view(0, int64_t(rows.logit_rows.size()));
  get_rows(ex, x, RowPlan::i32(rows.logit_rows), h);
  norm(ex, spec.norm, h, tensor_of(M.decoder.output_norm), tensor_of(M.decoder.output_norm_b), h, c.norm_eps);
  if (!hidden_out) linear(M.output, h, logits);
}

}  // namespace pe
