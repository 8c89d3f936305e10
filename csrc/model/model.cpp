#include "model/model.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "ops/matmul.h"

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
  Tensor matrix(const std::string& name, int64_t rows, int64_t cols, bool required = true) const {
    const GGUFTensorInfo* t = find(name, required);
    if (!t) return Tensor{};
    const int64_t r = t->ne.size() > 1 ? t->ne[1] : 1;
    bool extra = false;
    for (size_t d = 2; d < t->ne.size(); d++) extra |= t->ne[d] != 1;
    PE_CHECK(t->ne[0] == cols && r == rows && !extra, ModelFormatError, f_.path(), ": tensor '", name,
             "' has shape ", shape(*t), ", expected [", cols, ", ", rows, "] from the hyper-parameters");
    PE_CHECK(matmul_supports(GGMLType(t->type)), UnsupportedModelError, f_.path(), ": tensor '", name, "' has type ",
             type_name(t->type), ", which this engine cannot multiply yet");
    return Tensor{GGMLType(t->type), const_cast<uint8_t*>(t->data), rows, cols, row_bytes(GGMLType(t->type), cols)};
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

  decoder.output_norm = ld.vec("output_norm.weight", c.n_embd);
  if (c.spec.norm == NormType::Layer) decoder.output_norm_b = ld.vec("output_norm.bias", c.n_embd, false);
  output = ld.linear("output", cfg_.n_vocab, c.n_embd, false);
  if (!output.present()) output.w = tok_embd;  // tied embeddings

  if (const GGUFTensorInfo* rf = ld.find("rope_freqs.weight", false)) {
    (void)rf;
    rope_freqs = ld.vec("rope_freqs.weight", c.rope.n_dims / 2);
    cfg_.rope.freq_factors = rope_freqs.data();
  }

  const int64_t q_dim = c.n_head * c.head_dim, kv_dim = c.n_head_kv * c.head_dim;
  decoder.layers.resize(size_t(c.n_layer));
  for (int64_t l = 0; l < c.n_layer; l++) {
    Layer& L = decoder.layers[size_t(l)];
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

}  // namespace pe
