#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ops/activation.h"
#include "ops/norm.h"
#include "ops/rope.h"

namespace pe {

namespace {

class Loader {
 public:
  explicit Loader(const GGUFFile& f) : f_(f) {}

  const GGUFTensorInfo* find(const std::string& name, bool required) const {
    const GGUFTensorInfo* t = f_.find_tensor(name);
    PE_CHECK(t || !required, ModelFormatError, f_.path(), ": missing tensor '", name, "'");
    return t;
  }

  // A [rows x cols] weight matrix (ggml shape ne = {cols, rows}), used in place in the mapping.
  WeightView matrix(const std::string& name, int64_t rows, int64_t cols, bool required = true) const {
    const GGUFTensorInfo* t = find(name, required);
    if (!t) return WeightView{};
    const int64_t r = t->ne.size() > 1 ? t->ne[1] : 1;
    bool extra = false;
    for (size_t d = 2; d < t->ne.size(); d++) extra |= t->ne[d] != 1;
    PE_CHECK(t->ne[0] == cols && r == rows && !extra, ModelFormatError, f_.path(), ": tensor '", name,
             "' has shape ", shape(*t), ", expected [", cols, ", ", rows, "] from the hyper-parameters");
    PE_CHECK(matmul_supports(GGMLType(t->type)), UnsupportedModelError, f_.path(), ": tensor '", name, "' has type ",
             type_name(t->type), ", which this engine cannot multiply yet");
    return WeightView{GGMLType(t->type), t->data, rows, cols, row_bytes(GGMLType(t->type), cols)};
  }

  Linear linear(const std::string& base, int64_t rows, int64_t cols, bool required = true) const {
    Linear l;
    l.w = matrix(base + ".weight", rows, cols, required);
    if (l.present()) l.b = vec(base + ".bias", rows, false);
    return l;
  }

  // A 1-D float tensor of n elements, converted to F32.
  Vec vec(const std::string& name, int64_t n, bool required = true) const {
    const GGUFTensorInfo* t = find(name, required);
    if (!t) return {};
    PE_CHECK(t->nelements() == n && t->ne[0] == n, ModelFormatError, f_.path(), ": tensor '", name, "' has shape ",
             shape(*t), ", expected [", n, "]");
    Vec out(static_cast<size_t>(n));
    switch (GGMLType(t->type)) {
      case GGMLType::F32: std::memcpy(out.data(), t->data, size_t(n) * 4); break;
      case GGMLType::F16:
        for (int64_t i = 0; i < n; i++) out[i] = fp16_to_fp32(reinterpret_cast<const fp16_t*>(t->data)[i]);
        break;
      case GGMLType::BF16:
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_fp32(reinterpret_cast<const bf16_t*>(t->data)[i]);
        break;
      default:
        PE_THROW(UnsupportedModelError, f_.path(), ": 1-D tensor '", name, "' has type ", type_name(t->type),
                 " (F32, F16 or BF16 expected)");
    }
    return out;
  }

 private:
  static std::string shape(const GGUFTensorInfo& t) {
    std::string s = "[";
    for (size_t d = 0; d < t.ne.size(); d++) s += (d ? ", " : "") + std::to_string(t.ne[d]);
    return s + "]";
  }
  const GGUFFile& f_;
};

void add_inplace(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

}  // namespace

Model::Model(const std::string& path) : file_(std::make_shared<GGUFFile>(path)) {
  cfg_ = read_config(*file_);
  const ModelConfig& c = cfg_;
  Loader ld(*file_);

  const GGUFTensorInfo* emb = ld.find("token_embd.weight", true);
  PE_CHECK(emb->ne.size() >= 2 && emb->ne[0] == c.n_embd, ModelFormatError, file_->path(),
           ": tensor 'token_embd.weight' has a row of ", emb->ne[0], " elements, expected embedding_length ", c.n_embd);
  cfg_.n_vocab = emb->ne[1];
  tok_embd = ld.matrix("token_embd.weight", cfg_.n_vocab, c.n_embd);

  output_norm = ld.vec("output_norm.weight", c.n_embd);
  if (c.spec.norm == NormType::Layer) output_norm_b = ld.vec("output_norm.bias", c.n_embd, false);
  output = ld.linear("output", cfg_.n_vocab, c.n_embd, false);
  if (!output.present()) output.w = tok_embd;  // tied embeddings

  if (const GGUFTensorInfo* rf = ld.find("rope_freqs.weight", false)) {
    (void)rf;
    rope_freqs = ld.vec("rope_freqs.weight", c.rope.n_dims / 2);
    cfg_.rope.freq_factors = rope_freqs.data();
  }

  const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
  layers.resize(size_t(c.n_layer));
  for (int64_t l = 0; l < c.n_layer; l++) {
    Layer& L = layers[size_t(l)];
    const std::string b = "blk." + std::to_string(l) + ".";
    L.attn_norm = ld.vec(b + "attn_norm.weight", c.n_embd);
    if (c.spec.norm == NormType::Layer) L.attn_norm_b = ld.vec(b + "attn_norm.bias", c.n_embd, false);
    L.wqkv = ld.linear(b + "attn_qkv", q_dim + 2 * kv_dim, c.n_embd, false);
    if (!L.wqkv.present()) {
      L.wq = ld.linear(b + "attn_q", q_dim, c.n_embd);
      L.wk = ld.linear(b + "attn_k", kv_dim, c.n_embd);
      L.wv = ld.linear(b + "attn_v", kv_dim, c.n_embd);
    }
    L.wo = ld.linear(b + "attn_output", c.n_embd, q_dim);
    L.ffn_norm = ld.vec(b + "ffn_norm.weight", c.n_embd);
    if (c.spec.norm == NormType::Layer) L.ffn_norm_b = ld.vec(b + "ffn_norm.bias", c.n_embd, false);
    if (c.spec.gated_ffn && !c.spec.fused_gate_up) L.w_gate = ld.linear(b + "ffn_gate", c.n_ff, c.n_embd);
    L.w_up = ld.linear(b + "ffn_up", c.spec.fused_gate_up ? 2 * c.n_ff : c.n_ff, c.n_embd);
    L.w_down = ld.linear(b + "ffn_down", c.n_embd, c.n_ff);
  }
}

Context::Context(std::shared_ptr<const Model> model, int64_t n_ctx, int n_threads, int64_t n_batch,
                 GGMLType kv_type)
    : model_(std::move(model)), n_ctx_(n_ctx), n_batch_(n_batch), pool_(n_threads) {
  const ModelConfig& c = model_->config();
  PE_CHECK(n_ctx > 0 && n_ctx <= (int64_t(1) << 24), Error, "n_ctx must be in [1, 16M], not ", n_ctx);
  PE_CHECK(n_batch > 0, Error, "n_batch must be positive");
  PE_CHECK(kv_type == GGMLType::F16 || kv_type == GGMLType::F32, Error, "KV cache type must be F16 or F32");
  const size_t kv_bytes = size_t(c.n_head_kv * n_ctx * c.head_dim) * (kv_type == GGMLType::F16 ? 2 : 4);
  k_cache_.assign(kv_bytes * size_t(c.n_layer), 0);
  v_cache_.assign(kv_bytes * size_t(c.n_layer), 0);
  for (int64_t l = 0; l < c.n_layer; l++)
    kv_.push_back(KVLayer{k_cache_.data() + size_t(l) * kv_bytes, v_cache_.data() + size_t(l) * kv_bytes, kv_type,
                          int(c.n_head_kv), int(c.head_dim), n_ctx});
  reserve_rows(n_batch);
}

void Context::reserve_rows(int64_t rows) {
  if (int64_t(pos_.size()) >= rows) return;
  const ModelConfig& c = model_->config();
  const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
  x_.resize(size_t(rows * c.n_embd));
  xn_.resize(size_t(rows * c.n_embd));
  qkv_.resize(size_t(rows * (q_dim + 2 * kv_dim)));
  attn_.resize(size_t(rows * q_dim));
  ff_a_.resize(size_t(rows * 2 * c.n_ff));
  ff_b_.resize(size_t(rows * c.n_ff));
  pos_.resize(size_t(rows));
  block_pos_.resize(size_t(rows));
}

void Context::truncate(int64_t n) {
  PE_CHECK(n >= 0 && n <= n_past_, Error, "cannot truncate to ", n, " tokens: the context holds ", n_past_);
  n_past_ = n;
  if (model_->config().spec.rope_2d) {
    history_.resize(size_t(n));
    if (prefix_len_ >= n) prefix_len_ = mask_pos_ = -1;
  }
}

void Context::eval(const int32_t* tokens, int64_t n, float* logits, bool all_logits) {
  PE_CHECK(n > 0, Error, "eval needs at least one token");
  PE_CHECK(n_past_ + n <= n_ctx_, ContextLengthError, "context overflow: ", n_past_, " tokens in the context + ", n,
           " new > n_ctx ", n_ctx_);
  const ModelConfig& c = model_->config();
  const int64_t n_vocab = c.n_vocab;
  for (int64_t i = 0; i < n; i++)
    PE_CHECK(tokens[i] >= 0 && tokens[i] < n_vocab, Error, "token id ", tokens[i], " at index ", i,
             " is out of range [0, ", n_vocab, ")");

  // 2-D RoPE: the BOS token fixes the bidirectional prefix and the generation position. Tokens of the
  // prefix already in the cache attended only causally, so the whole prefix is evaluated again.
  const int32_t* seq = tokens;
  int64_t n_seq = n, skip = 0;  // skip: replayed tokens before `tokens`, which get no logits
  std::vector<int32_t> replay;
  if (c.spec.rope_2d && prefix_len_ < 0) {
    const int32_t* bos = std::find(tokens, tokens + n, int32_t(c.prefix_end_token));
    if (bos != tokens + n) {
      if (n_past_ > 0) {
        replay.assign(history_.begin(), history_.begin() + n_past_);
        replay.insert(replay.end(), tokens, tokens + n);
        seq = replay.data();
        n_seq = int64_t(replay.size());
        skip = n_past_;
        n_past_ = 0;
        history_.clear();
      }
      prefix_len_ = n_past_ + (std::find(seq, seq + n_seq, int32_t(c.prefix_end_token)) - seq);
      const int32_t* mask = std::find(seq, seq + (prefix_len_ - n_past_), int32_t(c.mask_token));
      // No mask token: generate as if it were just before BOS, where THUDM's prompts put [gMASK].
      mask_pos_ = mask != seq + (prefix_len_ - n_past_) ? n_past_ + (mask - seq) : prefix_len_ - 1;
    }
  }

  for (int64_t done = 0; done < n_seq;) {
    int64_t m = std::min(n_batch_, n_seq - done);
    if (prefix_len_ > n_past_) m = std::max(m, prefix_len_ - n_past_);  // a bidirectional prefix is one chunk
    reserve_rows(m);
    float* out = nullptr;
    int64_t first = m;
    if (logits && all_logits) {
      first = std::min(m, std::max<int64_t>(0, skip - done));
      out = logits + (done + first - skip) * n_vocab;
    } else if (logits && done + m == n_seq) {
      first = m - 1;
      out = logits;
    }
    if (c.spec.rope_2d) history_.insert(history_.end(), seq + done, seq + done + m);
    forward_chunk(seq + done, m, first < m ? out : nullptr, first);
    done += m;
  }
}

void Context::forward_chunk(const int32_t* tokens, int64_t n, float* logits, int64_t first_logit) {
  const Model& M = *model_;
  const ModelConfig& c = M.config();
  const int64_t d = c.n_embd, hd = c.head_dim;
  const int64_t q_dim = c.n_head * hd, kv_dim = c.n_head_kv * hd, qkv_w = q_dim + 2 * kv_dim;
  const bool fused = c.spec.fused_gate_up;
  const int64_t ff_w = fused ? 2 * c.n_ff : c.n_ff;  // row stride of ff_a_
  float *x = x_.data(), *xn = xn_.data(), *qkv = qkv_.data(), *att = attn_.data(), *fa = ff_a_.data(),
        *fb = ff_b_.data();
  ThreadPool& pool = pool_;

  for (int64_t t = 0; t < n; t++) {
    const int64_t p = n_past_ + t;
    const bool generated = prefix_len_ >= 0 && p >= prefix_len_;  // 2-D RoPE only
    pos_[t] = int32_t(generated ? mask_pos_ : p);
    block_pos_[t] = int32_t(generated ? p - prefix_len_ + 1 : 0);
    dequantize_row(M.tok_embd, tokens[t], x + t * d);
  }

  auto norm = [&](const float* in, const Vec& w, const Vec& b, float* out, int64_t rows) {
    if (c.spec.norm == NormType::RMS) rms_norm(in, w.data(), out, rows, d, c.norm_eps, pool);
    else layer_norm(in, w.data(), b.empty() ? nullptr : b.data(), out, rows, d, c.norm_eps, pool);
  };
  auto linear = [&](const Linear& L, const float* in, int64_t ldx, float* out, int64_t ldy, int64_t rows) {
    matmul(L.w, in, rows, ldx, out, ldy, pool);
    if (!L.b.empty()) add_bias(out, L.b.data(), rows, L.w.rows, ldy);
  };

  auto rope_heads = [&](float* heads, int n_heads) {
    rope(heads, n, qkv_w, n_heads, int(hd), pos_.data(), c.rope, pool);
    if (c.spec.rope_2d) rope(heads + c.rope.n_dims, n, qkv_w, n_heads, int(hd), block_pos_.data(), c.rope, pool);
  };
  // ChatGLM-6B: the residual stream restarts from the normalized input, times alpha.
  auto residual_from_norm = [&]() {
    if (c.spec.residual_from_norm)
      for (int64_t i = 0; i < n * d; i++) x[i] = xn[i] * c.residual_scale;
  };

  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t bidirectional_until = std::max<int64_t>(prefix_len_, 0);
  for (int64_t l = 0; l < c.n_layer; l++) {
    const Layer& L = M.layers[size_t(l)];
    // Attention block.
    norm(x, L.attn_norm, L.attn_norm_b, xn, n);
    residual_from_norm();
    if (L.wqkv.present()) {
      linear(L.wqkv, xn, d, qkv, qkv_w, n);
    } else {
      linear(L.wq, xn, d, qkv, qkv_w, n);
      linear(L.wk, xn, d, qkv + q_dim, qkv_w, n);
      linear(L.wv, xn, d, qkv + q_dim + kv_dim, qkv_w, n);
    }
    rope_heads(qkv, int(c.n_head));
    rope_heads(qkv + q_dim, int(c.n_head_kv));
    kv_store(kv_[size_t(l)], qkv + q_dim, qkv + q_dim + kv_dim, qkv_w, n, n_past_);
    attention(qkv, qkv_w, n, int(c.n_head), kv_[size_t(l)], n_past_, scale, att, q_dim, pool, bidirectional_until);
    linear(L.wo, att, q_dim, xn, d, n);
    add_inplace(x, xn, n * d);
    // Feed-forward block.
    norm(x, L.ffn_norm, L.ffn_norm_b, xn, n);
    residual_from_norm();
    if (fused) {
      linear(L.w_up, xn, d, fa, ff_w, n);
      gated_activation(c.spec.act, fa, fa + c.n_ff, fa, n, c.n_ff, ff_w, pool);
    } else if (c.spec.gated_ffn) {
      linear(L.w_gate, xn, d, fa, ff_w, n);
      linear(L.w_up, xn, d, fb, ff_w, n);
      gated_activation(c.spec.act, fa, fb, fa, n, c.n_ff, ff_w, pool);
    } else {
      linear(L.w_up, xn, d, fa, ff_w, n);
      activation_inplace(c.spec.act, fa, n, c.n_ff, ff_w, pool);
    }
    linear(L.w_down, fa, ff_w, xn, d, n);
    add_inplace(x, xn, n * d);
  }
  n_past_ += n;

  if (!logits) return;
  const int64_t first = first_logit, rows = n - first;
  norm(x + first * d, M.output_norm, M.output_norm_b, xn, rows);
  linear(M.output, xn, d, logits, c.n_vocab, rows);
}

}  // namespace pe
