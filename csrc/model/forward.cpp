// The math of each family, in order, with the paper's names (STYLE.md: llama2.c's forward()). Every
// step is an op on tensors (csrc/ops/), so this file is the same on every backend.
#include "model/forward.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/finite.h"
#include "ops/activation.h"
#include "ops/attention.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/norm.h"
#include "ops/rope.h"
#include "ops/top_logits.h"

namespace pe {

void RowPlan::clear() {
  for (auto* v : {&token, &seq, &rope_pos, &rope_pos2, &key_begin, &key_end, &slot, &logit_rows, &key_begin_window,
                  &prefix_slot, &cross_key_begin, &cross_key_end})
    v->clear();
}

void Activations::reserve(const ModelConfig& c, int64_t n_rows, Device device) {
  const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
  const size_t f = sizeof(float) * size_t(n_rows);
  for (Buffer* b : {&x, &xn, &qkv, &att, &ff_a, &ff_b, &out, &rows})
    if (b->device() != device) *b = Buffer(device, 0);
  x.reserve(f * size_t(c.n_embd));
  xn.reserve(f * size_t(c.n_embd));
  qkv.reserve(f * size_t(q_dim + 2 * kv_dim));
  att.reserve(f * size_t(q_dim));
  ff_a.reserve(f * size_t(2 * c.n_ff));
  ff_b.reserve(f * size_t(c.n_ff));
  if (c.n_expert > 0) {
    if (moe_out.device() != device) moe_out = Buffer(device, 0);
    moe_out.reserve(f * size_t(c.n_embd));
    moe.reserve(moe_params(c), c.n_embd, n_rows, device);
  }
}

MoEParams moe_params(const ModelConfig& c) {
  MoEParams p;
  p.n_expert = c.n_expert;
  p.n_used = c.n_expert_used;
  p.n_ff = c.n_ff_exp;
  p.norm_weights = c.expert_weights_norm;
  p.act = c.spec.act;
  return p;
}

RowTensors Activations::upload(Executor& ex, const RowPlan& p) {
  const std::vector<int32_t>* v[] = {&p.token, &p.seq,  &p.rope_pos,   &p.rope_pos2,        &p.key_begin,
                                     &p.key_end, &p.slot, &p.logit_rows, &p.key_begin_window, &p.prefix_slot,
                                     &p.cross_key_begin, &p.cross_key_end};
  constexpr int kN = 12;
  Tensor* t[kN];
  RowTensors r;
  t[0] = &r.token, t[1] = &r.seq, t[2] = &r.rope_pos, t[3] = &r.rope_pos2;
  t[4] = &r.key_begin, t[5] = &r.key_end, t[6] = &r.slot, t[7] = &r.logit_rows, t[8] = &r.key_begin_window;
  t[9] = &r.prefix_slot, t[10] = &r.cross_key_begin, t[11] = &r.cross_key_end;
  const Device dev = ex.device();
  std::vector<int32_t> packed;  // one copy to the GPU for all of them
  if (dev != Device::CPU) {
    for (auto* vec : v) packed.insert(packed.end(), vec->begin(), vec->end());
    if (rows.device() != dev) rows = Buffer(dev, 0);
    rows.reserve(packed.size() * sizeof(int32_t));
    copy_between(ex, dev, rows.data(), Device::CPU, packed.data(), packed.size() * sizeof(int32_t));
  }
  size_t off = 0;
  for (int i = 0; i < kN; i++) {
    const int64_t n = int64_t(v[i]->size());
    int32_t* data = dev == Device::CPU ? const_cast<int32_t*>(v[i]->data()) : static_cast<int32_t*>(rows.data()) + off;
    *t[i] = Tensor{GGMLType::I32, data, 1, n, size_t(n) * sizeof(int32_t), dev};
    off += size_t(n);
  }
  return r;
}

namespace {

// One block of the decoder stack (attention, then feed-forward, each pre-normed with a residual),
// for the n rows of `x` on the part's device. normed: xn already holds the block's attention pre-norm.
// next: the block that follows on the same device, or null; with one, a pre-norm block ends with its
// residual add fused with the next block's pre-norm (add_norm) and returns true (xn holds that norm).
bool decoder_block(Executor& ex, const ModelConfig& c, const ContextRope& rope_ctx, const Layer& L, int64_t layer,
                   const StackPart& part, int kv_layer, const RowTensors& rt, Activations& a, int64_t n, bool normed,
                   const Layer* next) {
  KVCache& kv = *part.kv;
  const ArchSpec& spec = c.spec;
  const Device dev = ex.device();
  const int64_t d = c.n_embd, hd = c.head_dim, n_ff = c.n_ff;
  const int64_t q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd, qkv_w = q_dim + 2 * kv_dim;
  auto f32 = [&](Buffer& b, int64_t cols) { return f32_tensor(static_cast<float*>(b.data()), n, cols, cols, dev); };
  const Tensor x = f32(a.x, d), xn = f32(a.xn, d), qkv = f32(a.qkv, qkv_w), att = f32(a.att, q_dim);
  const Tensor q = qkv.cols_view(0, q_dim), k = qkv.cols_view(q_dim, kv_dim), v = qkv.cols_view(q_dim + kv_dim, kv_dim);
  // FFN hidden: [gate | up] side by side when w_up holds both (ChatGLM2+, and every gated FFN a device
  // copy stacked: model.cpp's layer_runs), else gate in ff_a, up in ff_b.
  const bool gate_up_stacked = spec.gated_ffn && !L.w_gate.present();
  const Tensor ff_a = f32(a.ff_a, gate_up_stacked ? 2 * n_ff : n_ff), ff_b = f32(a.ff_b, n_ff);
  const Tensor hidden = ff_a.cols_view(0, n_ff);

  // Pre-norm of the residual stream x into xn; ChatGLM-6B restarts the stream from it, times alpha.
  auto pre_norm = [&](const Tensor& w, const Tensor& b) {
    norm(ex, spec.norm, x, w, b, xn, c.norm_eps);
    if (spec.residual_from_norm) scale(ex, xn, c.residual_scale, x);
  };
  auto stats = [&](const Linear& W, const Tensor& in) {
    if (a.input_stats) a.input_stats->add(W.w, in, ex.n_threads() > 1 ? &ex.pool() : nullptr);
  };
  auto linear = [&](const Linear& W, const Tensor& in, const Tensor& out) {
    stats(W, in);
    matmul(ex, W.w, in, out, part.rounding);
    if (!W.b.empty()) add_bias(ex, out, W.b);
  };
  // Linears that read the same input (q, k, v; gate, up) go to matmul together.
  auto linears = [&](std::initializer_list<const Linear*> W, std::vector<Tensor> out, const Tensor& in) {
    std::vector<Tensor> w;
    for (const Linear* l : W) {
      stats(*l, in);
      w.push_back(l->w);
    }
    matmul(ex, w, in, out, part.rounding);
    auto o = out.begin();
    for (const Linear* l : W) {
      if (!l->b.empty()) add_bias(ex, *o, l->b);
      ++o;
    }
  };
  const RopeParams& rope_params = c.windowed(layer) ? rope_ctx.windowed : rope_ctx.global;
  auto rotate = [&](const Tensor& heads, int n_heads) {
    if (spec.positions == Positions::Learned) return;  // added to the embeddings instead
    if (spec.positions == Positions::RelativeBuckets) return;  // a bias of the attention scores instead
    if (!c.alibi_slopes.empty()) return;               // ALiBi: positions enter as attention biases
    rope(ex, heads, n_heads, int(hd), 0, rt.rope_pos, rope_params);
    if (spec.positions == Positions::Rope2D) rope(ex, heads, n_heads, int(hd), c.rope.n_dims, rt.rope_pos2, rope_ctx.global);
  };

  // Post-norm (BERT): each sublayer reads x itself and the norm follows the residual add.
  const bool post = spec.post_norm;
  auto post_norm = [&](const Tensor& w, const Tensor& b) {
    if (post) norm(ex, spec.norm, x, w, b, x, c.norm_eps);
  };
  // Pre-norm: a sublayer's output r joins the residual stream and the next sublayer's pre-norm follows
  // at once, in one op where nothing else comes between them.
  auto add_pre_norm = [&](const Tensor& r, const Tensor& w, const Tensor& b) {
    if (spec.residual_from_norm) {
      add(ex, x, r);
      pre_norm(w, b);
    } else {
      add_norm(ex, spec.norm, x, r, w, b, xn, c.norm_eps);
    }
  };

  // Attention block.
  if (!post && !normed) pre_norm(L.attn_norm, L.attn_norm_b);
  const Tensor& attn_in = post ? x : xn;
  if (L.wqkv.present()) {
    linear(L.wqkv, attn_in, qkv);
  } else {
    linears({&L.wq, &L.wk, &L.wv}, {q, k, v}, attn_in);
  }
  if (!L.attn_q_norm.empty()) norm_heads(ex, q, int(c.n_head), L.attn_q_norm, c.norm_eps);
  if (!L.attn_k_norm.empty()) norm_heads(ex, k, int(c.n_head_kv), L.attn_k_norm, c.norm_eps);
  // q and k side by side in qkv take one rotation (the same angles for both).
  rotate(qkv.cols_view(0, q_dim + kv_dim), int(c.n_head + c.n_head_kv));
  // P-Tuning v2: a sequence that starts in this pass begins with the layer's learned prefix, keys as
  // stored (THUDM's prefix keys carry no RoPE), which all its rows attend to.
  for (int64_t j = 0; j < rt.prefix_slot.cols; j += c.prefix_length)
    kv.store(ex, kv_layer, L.prefix_k, L.prefix_v, rt.prefix_slot.cols_view(j, c.prefix_length));
  const Tensor& key_begin = c.windowed(layer) ? rt.key_begin_window : rt.key_begin;
  PositionBias bias = part.bias;
  bias.query_pos = rt.rope_pos;
  store_and_attend(ex, q, k, v, rt.slot, int(c.n_head), kv, kv_layer, AttentionRows{rt.seq, key_begin, rt.key_end},
                   c.kq_scale, att, c.attn_softcap, c.alibi_slopes.empty() ? nullptr : c.alibi_slopes.data(),
                   bias.table ? &bias : nullptr);
  linear(L.wo, att, xn);
  if (!L.attn_post_norm.empty()) norm(ex, spec.norm, xn, L.attn_post_norm, Tensor{}, xn, c.norm_eps);
  if (post) {
    add(ex, x, xn);
    post_norm(L.attn_norm, L.attn_norm_b);
  } else if (L.cross_q.present()) {
    add_pre_norm(xn, L.cross_norm, L.cross_norm_b);
  } else {
    add_pre_norm(xn, L.ffn_norm, L.ffn_norm_b);
  }
  // Cross-attention (encoder-decoder): queries from the decoder, keys and values of the encoder's output,
  // computed once per input (Context::encode); every encoder position is visible, without a position bias.
  if (L.cross_q.present()) {
    linear(L.cross_q, post ? x : xn, q);
    attention(ex, q, int(c.n_head), *part.cross, kv_layer, AttentionRows{rt.seq, rt.cross_key_begin, rt.cross_key_end},
              c.kq_scale, att);
    linear(L.cross_o, att, xn);
    if (post) {
      add(ex, x, xn);
      post_norm(L.cross_norm, L.cross_norm_b);
    } else {
      add_pre_norm(xn, L.ffn_norm, L.ffn_norm_b);
    }
  }
  // Feed-forward block: one FFN, or a mixture of experts.
  const Tensor& ffn_in = post ? x : xn;
  Tensor ffn_out = xn;
  if (L.moe()) {
    ffn_out = f32(a.moe_out, d);
    moe_ffn(ex, L.experts, moe_params(c), ffn_in, ffn_out, a.moe, "blk." + std::to_string(layer), a.input_stats);
  } else {
    if (gate_up_stacked) {
      linear(L.w_up, ffn_in, ff_a);
      gated_activation(ex, spec.act, hidden, ff_a.cols_view(n_ff, n_ff), hidden);
    } else if (spec.gated_ffn) {
      linears({&L.w_gate, &L.w_up}, {hidden, ff_b}, ffn_in);
      gated_activation(ex, spec.act, hidden, ff_b, hidden);
    } else {
      linear(L.w_up, ffn_in, hidden);
      activation(ex, spec.act, hidden);
    }
    linear(L.w_down, hidden, xn);
  }
  if (!L.ffn_post_norm.empty()) norm(ex, spec.norm, ffn_out, L.ffn_post_norm, Tensor{}, ffn_out, c.norm_eps);
  if (next && !post) {
    add_pre_norm(ffn_out, next->attn_norm, next->attn_norm_b);
    return true;
  }
  add(ex, x, ffn_out);
  post_norm(L.ffn_norm, L.ffn_norm_b);
  return false;
}

}  // namespace

// top_logits of the head's output y (on its device) into the summary's host arrays; false when a row
// holds a NaN or an infinity.
static bool summarize(Executor& ex, const Tensor& y, const LogitsSummary& s, Activations& a) {
  const int64_t n = y.rows, k_max = s.k_max;
  const Device dev = ex.device();
  auto i32 = [&](void* p, int64_t rows, int64_t cols) {
    return Tensor{GGMLType::I32, p, rows, cols, size_t(cols) * sizeof(int32_t), dev};
  };
  if (dev == Device::CPU) {
    top_logits(ex, y, i32(const_cast<int32_t*>(s.k), 1, n), f32_tensor(const_cast<float*>(s.inv_t), 1, n, n),
               i32(s.ids, n, k_max), f32_tensor(s.values, n, k_max, k_max), f32_tensor(s.stats, n, 2, 2));
  } else {
    // One upload of the requests and one download of the results: [k | inv_t | ids | values | stats].
    const size_t in_bytes = size_t(2 * n) * 4, out_floats = size_t(n * (2 * k_max + 2));
    if (a.top.device() != dev) a.top = Buffer(dev, 0);
    a.top.reserve(in_bytes + out_floats * 4);
    auto* base = static_cast<uint8_t*>(a.top.data());
    std::vector<uint8_t> staged(in_bytes);
    std::memcpy(staged.data(), s.k, size_t(n) * 4);
    std::memcpy(staged.data() + size_t(n) * 4, s.inv_t, size_t(n) * 4);
    copy_between(ex, dev, base, Device::CPU, staged.data(), in_bytes);
    auto* res = reinterpret_cast<float*>(base + in_bytes);
    top_logits(ex, y, i32(base, 1, n), f32_tensor(reinterpret_cast<float*>(base) + n, 1, n, n, dev),
               i32(res, n, k_max), f32_tensor(res + n * k_max, n, k_max, k_max, dev),
               f32_tensor(res + 2 * n * k_max, n, 2, 2, dev));
    std::vector<float> back(out_floats);
    copy_between(ex, Device::CPU, back.data(), dev, res, out_floats * 4);
    std::memcpy(s.ids, back.data(), size_t(n * k_max) * 4);
    std::memcpy(s.values, back.data() + n * k_max, size_t(n * k_max) * 4);
    std::memcpy(s.stats, back.data() + 2 * n * k_max, size_t(n * 2) * 4);
  }
  for (int64_t r = 0; r < n; r++)
    if (s.stats[2 * r + 1] != 0.f) return false;
  return true;
}

void forward_decoder(const Model& M, const StackPart& cpu, const std::vector<StackPart>& parts,
                     const StackPart& head_part, const StackInput& input, const Head& head, const RowPlan& rows,
                     const ContextRope& rope, const Tensor& out, bool hidden_out, const LogitsSummary* summary) {
  const ModelConfig& c = M.config();
  const int64_t n = rows.size(), d = c.n_embd;
  const size_t x_bytes = size_t(n * d) * sizeof(float);

  // Token embeddings: looked up on the CPU, where the embedding table stays.
  RowTensors host_rows = cpu.act->upload(*cpu.ex, rows);
  const Tensor x0 = f32_tensor(static_cast<float*>(cpu.act->x.data()), n, d, d);
  get_rows(*cpu.ex, M.tok_embd, host_rows.token, x0);
  if (c.embd_scale != 1.f) scale(*cpu.ex, x0, c.embd_scale, x0);
  if (c.spec.positions == Positions::Learned) {
    const Tensor pos = f32_tensor(static_cast<float*>(cpu.act->xn.data()), n, d, d);
    get_rows(*cpu.ex, input.position_embd, host_rows.rope_pos, pos);  // checks every position against the table
    add(*cpu.ex, x0, pos);
    if (!M.token_type.empty()) add_bias(*cpu.ex, x0, M.token_type);
  }
  if (c.spec.embedding_norm) norm(*cpu.ex, c.spec.norm, x0, input.norm, input.norm_b, x0, c.norm_eps);

  // The residual stream x (n x d, contiguous) moves to a part's device when it changes.
  const StackPart* prev = &cpu;
  auto enter = [&](const StackPart& part) {
    if (prev->ex->device() != part.ex->device())
      copy_between(*part.ex, part.ex->device(), part.act->x.data(), prev->ex->device(), prev->act->x.data(), x_bytes);
    prev = &part;
    return part.ex->device() == Device::CPU ? host_rows : part.act->upload(*part.ex, rows);
  };
  // A NaN or Inf never recovers (norms, softmax and the quantized matmuls spread it: see QuantizedX),
  // so the first block whose output has one is named, instead of sampling from NaN logits. The
  // check reads n x d floats per block on the CPU (under 1% of a block's time); blocks on a GPU are
  // covered by the check of the output below.
  auto non_finite = [&](const std::string& where) {
    return NumericalError(str_cat(M.file().path(), ": non-finite values (NaN or Inf) in ", where,
                                  ": the weights or a norm/scale parameter there hold NaN/Inf, or the "
                                  "activations overflowed"));
  };
  if (!cpu::all_finite(static_cast<const float*>(cpu.act->x.data()), n * d))
    throw non_finite("the token embeddings (token_embd.weight) of this batch's tokens");
  // The output norm and LM head on the rows whose output is wanted only, into y on the head's device.
  const bool want_out = (!out.empty() || summary) && !rows.logit_rows.empty();
  const int64_t n_out = int64_t(rows.logit_rows.size()), width = hidden_out ? d : c.n_vocab;
  const Device head_dev = head_part.ex->device();
  if (want_out && head_dev != Device::CPU) head_part.act->out.reserve(size_t(n_out * width) * sizeof(float));
  const Tensor y = head_dev == Device::CPU
                       ? out
                       : f32_tensor(static_cast<float*>(head_part.act->out.data()), n_out, width, width, head_dev);
  auto run_head = [&](const RowTensors& rt) {
    Executor& ex = *head_part.ex;
    Activations& a = *head_part.act;
    const Tensor x = f32_tensor(static_cast<float*>(a.x.data()), n, d, d, head_dev);
    const Tensor h = hidden_out ? y : f32_tensor(static_cast<float*>(a.xn.data()), n_out, d, d, head_dev);
    get_rows(ex, x, rt.logit_rows, h);
    if (!head.output_norm.empty()) norm(ex, c.spec.norm, h, head.output_norm, head.output_norm_b, h, c.norm_eps);
    if (!hidden_out) {
      if (head.output_scale != 1.f) scale(ex, h, head.output_scale, h);
      matmul(ex, head.output.w, h, y);
      if (!head.output.b.empty()) add_bias(ex, y, head.output.b);
      if (c.final_softcap > 0.f) softcap(ex, y, c.final_softcap);
    }
  };

  RowTensors rt = host_rows;
  const StackPart* last = nullptr;  // the last part with blocks: the head runs with it when on its device
  for (const StackPart& part : parts)
    if (!part.layers.empty()) last = &part;
  bool head_done = false;
  for (const StackPart& part : parts) {
    if (part.layers.empty()) continue;
    rt = enter(part);
    const bool with_head = want_out && &part == last && part.ex == head_part.ex;
    auto run_blocks = [&] {
      bool normed = false;
      for (size_t i = 0; i < part.layers.size(); i++) {
        const Layer* next = i + 1 < part.layers.size() ? part.layers[i + 1] : nullptr;
        normed = decoder_block(*part.ex, c, rope, *part.layers[i], part.first + int64_t(i), part,
                               part.one_kv_layer ? 0 : int(i), rt, *part.act, n, normed, next);
        if (part.ex->device() == Device::CPU && !cpu::all_finite(static_cast<const float*>(part.act->x.data()), n * d)) {
          const int64_t l = part.first + int64_t(i);
          throw non_finite(str_cat("the output of layer ", l, " (tensors ", part.tensor_prefix, "blk.", l, ".*)"));
        }
      }
      if (with_head) run_head(rt);
    };
    // Everything the blocks read from the host goes up first, so that a decode-sized pass on a GPU can
    // be a replayed CUDA graph; its key is what the launches depend on besides the model: the rows'
    // shape, the scratch and cache they use, and attention's host-side choice.
    const int64_t attention_choice =
        attention_upload(*part.ex, *part.kv, n, int(c.n_head), c.alibi_slopes.empty() ? nullptr : c.alibi_slopes.data());
    constexpr int64_t kMaxCapturedRows = 8;  // decode steps; a prefill's launches are few and long
    if (part.ex->device() != Device::CPU && n <= kMaxCapturedRows && c.n_expert == 0 && !part.act->input_stats) {
      std::vector<int64_t> key = {n, n_out, hidden_out, with_head, attention_choice,
                                  int64_t(reinterpret_cast<intptr_t>(part.act)),
                                  int64_t(reinterpret_cast<intptr_t>(part.kv)), part.first};
      for (const std::vector<int32_t>* v : {&rows.rope_pos2, &rows.key_begin_window, &rows.prefix_slot,
                                            &rows.cross_key_begin})
        key.push_back(int64_t(v->size()));
      part.ex->run_captured(std::move(key), run_blocks);
    } else {
      run_blocks();
    }
    head_done |= with_head;
  }

  if (!want_out) return;
  if (!head_done) {
    if (prev->ex->device() != head_part.ex->device()) rt = enter(head_part);
    run_head(rt);
  }
  Executor& ex = *head_part.ex;
  const Device dev = head_dev;
  auto output_non_finite = [&] {
    const int64_t gpu_first = parts.size() > 1 && !parts.back().layers.empty() ? parts.back().first : c.n_layer;
    return non_finite(gpu_first < c.n_layer
                          ? str_cat("layers ", gpu_first, "..", c.n_layer - 1, " (on the GPU) or the output layer")
                          : std::string(hidden_out ? "the output norm (output_norm)" : "the output layer (output_norm, output)"));
  };
  if (summary) {
    if (!summarize(ex, y, *summary, *head_part.act)) throw output_non_finite();
    return;
  }
  if (dev != Device::CPU) copy_between(ex, Device::CPU, out.data, dev, y.data, size_t(n_out * width) * sizeof(float));
  for (int64_t r = 0; r < n_out; r++)
    if (!cpu::all_finite(out.row(r), width)) throw output_non_finite();
}

}  // namespace pe
