#include "model/config.h"

#include <cmath>

namespace pe {

namespace {
// llama.cpp's RoPE type per architecture: llama is converted with Q/K permuted so that it rotates
// adjacent pairs; qwen2 keeps HF's layout and rotates halves (NeoX).
// chatglm (ChatGLM2/3, GLM-4) rotates adjacent pairs of the first half of each head (rope.dimension_count
// = head_dim / 2) and stores Q/K/V fused as attn_qkv and gate/up fused as ffn_up, as llama.cpp does.
// chatglm1 (ChatGLM-6B) is ours, not llama.cpp's: LayerNorm, GELU, alpha-scaled residuals from the
// normalized input, 2-D RoPE (NeoX halves) with a bidirectional prompt prefix.
ArchSpec llama_like(const char* name, RopeStyle rope) {
  ArchSpec a{name};
  a.rope = rope;
  return a;
}
ArchSpec chatglm() {
  ArchSpec a{"chatglm"};
  a.fused_gate_up = true;
  return a;
}
ArchSpec chatglm1() {
  ArchSpec a{"chatglm1"};
  a.norm = NormType::Layer;
  a.rope = RopeStyle::NeoX;
  a.act = Activation::GELU;
  a.gated_ffn = false;
  a.residual_from_norm = true;
  a.positions = Positions::Rope2D;
  a.mask = Mask::PrefixLM;
  return a;
}
const ArchSpec kArchs[] = {
    llama_like("llama", RopeStyle::Adjacent),
    llama_like("qwen2", RopeStyle::NeoX),
    chatglm(),
    chatglm1(),
};
}  // namespace

std::string supported_architectures() {
  std::string s;
  for (const auto& a : kArchs) s += (s.empty() ? "" : ", ") + std::string(a.name);
  return s;
}

namespace {
// A float hyper-parameter that can only be positive and finite (anything else makes every output
// NaN, or divides by zero): checked at load, naming the key.
double positive_float(const GGUFFile& f, const std::string& key, double dflt) {
  const double v = f.get_float(key, dflt);
  PE_CHECK(std::isfinite(v) && v > 0, ModelFormatError, f.path(), ": metadata key '", key, "' is ", v,
           ": it must be a positive finite number");
  return v;
}
}  // namespace

ModelConfig read_config(const GGUFFile& f) {
  ModelConfig c;
  c.arch = f.get_str("general.architecture");
  const ArchSpec* spec = nullptr;
  for (const auto& a : kArchs)
    if (c.arch == a.name) spec = &a;
  PE_CHECK(spec, UnsupportedModelError, f.path(), ": architecture '", c.arch,
           "' is not supported (supported: ", supported_architectures(), ")");
  c.spec = *spec;
  const std::string p = c.arch + ".";
  c.n_embd = f.get_int(p + "embedding_length");
  c.n_layer = f.get_int(p + "block_count");
  c.n_ff = f.get_int(p + "feed_forward_length");
  c.n_head = f.get_int(p + "attention.head_count");
  c.n_head_kv = f.get_int(p + "attention.head_count_kv", c.n_head);
  c.n_ctx_train = f.get_int(p + "context_length", 2048);
  PE_CHECK(c.n_embd > 0 && c.n_layer > 0 && c.n_ff > 0 && c.n_head > 0 && c.n_head_kv > 0, ModelFormatError, f.path(),
           ": hyper-parameters must be positive (", p, "embedding_length/block_count/feed_forward_length/head_count)");
  // Bounds far above any real model, low enough that no size computed from them overflows.
  PE_CHECK(c.n_layer <= 4096 && c.n_head <= 4096 && c.n_embd <= (1 << 20) && c.n_ff <= (1 << 22), ModelFormatError,
           f.path(), ": implausible hyper-parameters (", c.n_layer, " layers, ", c.n_head, " heads, width ", c.n_embd,
           ", feed_forward_length ", c.n_ff, ")");
  PE_CHECK(c.n_ctx_train > 0, ModelFormatError, f.path(), ": ", p, "context_length ", c.n_ctx_train,
           " must be positive");
  PE_CHECK(c.n_head % c.n_head_kv == 0, ModelFormatError, f.path(), ": ", p, "attention.head_count (", c.n_head,
           ") is not a multiple of head_count_kv (", c.n_head_kv, ")");
  c.head_dim = f.get_int(p + "attention.key_length", c.n_embd / c.n_head);
  PE_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0 && c.head_dim <= 1024, ModelFormatError, f.path(), ": head size ",
           c.head_dim, " is invalid");
  PE_CHECK(f.get_int(p + "attention.value_length", c.head_dim) == c.head_dim, UnsupportedModelError, f.path(),
           ": different key and value head sizes are not supported");
  const char* eps_key = spec->norm == NormType::RMS ? "attention.layer_norm_rms_epsilon" : "attention.layer_norm_epsilon";
  c.norm_eps = float(positive_float(f, p + eps_key, 1e-5));
  PE_CHECK(c.norm_eps > 0, ModelFormatError, f.path(), ": metadata key '", p, eps_key, "' underflows float32");

  c.rope.style = spec->rope;
  const int64_t rope_dims = f.get_int(p + "rope.dimension_count", c.head_dim);
  PE_CHECK(rope_dims > 0 && rope_dims <= c.head_dim && rope_dims % 2 == 0, ModelFormatError, f.path(), ": ", p,
           "rope.dimension_count ", rope_dims, " must be even and at most the head size ", c.head_dim);
  c.rope.n_dims = int(rope_dims);
  c.rope.freq_base = float(positive_float(f, p + "rope.freq_base", 10000.0));
  PE_CHECK(std::isfinite(c.rope.freq_base) && c.rope.freq_base > 0, ModelFormatError, f.path(), ": metadata key '", p,
           "rope.freq_base' does not fit a float32");
  const std::string scaling = f.get_str(p + "rope.scaling.type", "none");
  if (scaling == "linear") {
    c.rope.freq_scale = float(1.0 / positive_float(f, p + "rope.scaling.factor", 1.0));
  } else if (f.find(p + "rope.scale_linear")) {
    c.rope.freq_scale = float(1.0 / positive_float(f, p + "rope.scale_linear", 1.0));
  } else {
    PE_CHECK(scaling == "none", UnsupportedModelError, f.path(), ": RoPE scaling type '", scaling,
             "' is not supported (none, linear, and Llama-3 rope_freqs are)");
  }
  if (spec->residual_from_norm) {
    c.residual_scale = float(f.get_float(p + "residual_scale"));
    PE_CHECK(std::isfinite(c.residual_scale), ModelFormatError, f.path(), ": metadata key '", p,
             "residual_scale' is ", c.residual_scale, ": it must be a finite number");
  }
  if (spec->positions == Positions::Rope2D) {
    PE_CHECK(2 * c.rope.n_dims <= c.head_dim, ModelFormatError, f.path(), ": ", p, "rope.dimension_count ",
             c.rope.n_dims, " must be at most half the head size ", c.head_dim, " for 2-D RoPE");
    c.mask_token = f.get_int("tokenizer.ggml.mask_token_id", -1);
  }
  if (spec->mask == Mask::PrefixLM) c.prefix_end_token = f.get_int("tokenizer.ggml.bos_token_id");
  return c;
}

}  // namespace pe
