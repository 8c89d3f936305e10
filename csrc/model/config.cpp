#include "model/config.h"

#include <cmath>

#include "ops/attention.h"

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
// Phi-3 (llama.cpp's phi3): fused attn_qkv and [gate; up] ffn_up, NeoX RoPE (partial where
// rope.dimension_count says).
ArchSpec phi3() {
  ArchSpec a = llama_like("phi3", RopeStyle::NeoX);
  a.fused_gate_up = true;
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
// BERT as llama.cpp's `bert`: learned absolute positions plus token type 0, a LayerNorm of the
// embeddings, post-LayerNorm blocks with biases everywhere, exact (erf) GELU, no LM head.
ArchSpec bert() {
  ArchSpec a{"bert"};
  a.family = Family::EncoderOnly;
  a.norm = NormType::Layer;
  a.act = Activation::GELUErf;
  a.gated_ffn = false;
  a.positions = Positions::Learned;
  a.mask = Mask::Bidirectional;
  a.post_norm = true;
  a.embedding_norm = true;
  a.attn_norm_name = "attn_output_norm";
  a.ffn_norm_name = "layer_output_norm";
  return a;
}
// GPT-2 as llama.cpp's `gpt2`: learned absolute positions, pre-LayerNorm blocks with biases, tanh
// GELU, fused attn_qkv, tied output.
ArchSpec gpt2() {
  ArchSpec a{"gpt2"};
  a.norm = NormType::Layer;
  a.act = Activation::GELU;
  a.gated_ffn = false;
  a.positions = Positions::Learned;
  return a;
}
// Gemma 2 (llama.cpp's gemma2): embeddings times sqrt(d), RMSNorm (the converter adds Gemma's +1 to
// the weights, as llama.cpp's), norms before and after attention and the FFN, tanh-GeGLU, NeoX RoPE,
// soft-capped attention scores and logits, a sliding window on even layers.
ArchSpec gemma2() {
  ArchSpec a = llama_like("gemma2", RopeStyle::NeoX);
  a.act = Activation::GELU;
  a.scale_embeddings = true;
  a.swa_pattern = 2;
  return a;
}
// Gemma 3 (text; llama.cpp's gemma3): Gemma 2 without soft-capping, with per-head q/k norms, five
// windowed layers to one global, and a RoPE base of its own on the windowed layers.
ArchSpec gemma3() {
  ArchSpec a = gemma2();
  a.name = "gemma3";
  a.swa_pattern = 6;
  return a;
}
// Qwen3-MoE (llama.cpp's qwen3moe): Qwen3's attention, mixture-of-experts FFNs.
ArchSpec qwen3moe() {
  ArchSpec a = llama_like("qwen3moe", RopeStyle::NeoX);
  a.moe = true;
  return a;
}
// Baichuan / Baichuan 2 (llama.cpp's baichuan): llama's layout (the converter splits W_pack into q/k/v and
// permutes q/k as for llama); 7B rotates with RoPE, 13B has no RoPE but ALiBi.
ArchSpec baichuan() {
  ArchSpec a = llama_like("baichuan", RopeStyle::Adjacent);
  a.alibi = true;
  return a;
}
// T5 (llama.cpp's t5: T5, flan-T5, mT5): an encoder and a decoder of pre-RMSNorm blocks without biases
// or a mean in the norm (T5LayerNorm), relative position buckets instead of positions, unscaled q.k,
// and a ReLU or gated-GELU FFN as the file has ffn_gate or not.
ArchSpec t5() {
  ArchSpec a{"t5"};
  a.family = Family::EncoderDecoder;
  a.act = Activation::ReLU;
  a.gated_ffn = false;
  a.positions = Positions::RelativeBuckets;
  a.decoder_prefix = "dec.";
  a.encoder_prefix = "enc.";
  a.attn_out_name = "attn_o";
  a.ffn_from_tensors = true;
  a.tied_head_scale = true;
  return a;
}
// BART (pyengine's own `bart`: llama.cpp has no BART) and mBART (`mbart`). An encoder and a decoder with
// cross-attention in T5's tensor names (enc./dec.blk.N.attn_q/k/v/o, ffn_up/down, attn_norm and ffn_norm
// for the self-attention's and the FFN's LayerNorm, cross_attn_q/k/v/o and cross_attn_norm), biases on
// every linear layer and norm, exact (erf) GELU, q.k scaled by head_dim^-0.5, learned absolute positions
// per stack (enc./dec.position_embd, stored without BART's offset of 2 rows: row p is position p), a
// LayerNorm of each stack's embeddings (enc./dec.token_embd_norm: layernorm_embedding), token embeddings
// times {arch}.embedding_scale (sqrt(d_model) when the config's scale_embedding says so), and the tied LM
// head plus final_logits_bias (output.bias). Keys: llama.cpp's generic ones ({arch}.context_length,
// embedding_length, block_count (the encoder's), decoder_block_count, feed_forward_length,
// attention.head_count, attention.layer_norm_epsilon, decoder_start_token_id, embedding_scale).
// bart: post-LayerNorm blocks (BERT's), no norm at the end of a stack.
ArchSpec bart() {
  ArchSpec a{"bart"};
  a.family = Family::EncoderDecoder;
  a.norm = NormType::Layer;
  a.act = Activation::GELUErf;
  a.gated_ffn = false;
  a.positions = Positions::Learned;
  a.post_norm = true;
  a.embedding_norm = true;
  a.decoder_prefix = "dec.";
  a.encoder_prefix = "enc.";
  a.attn_out_name = "attn_o";
  a.block_biases = true;
  return a;
}
// mbart: pre-LayerNorm blocks and a LayerNorm at the end of each stack (enc./dec.output_norm).
ArchSpec mbart() {
  ArchSpec a = bart();
  a.name = "mbart";
  a.post_norm = false;
  return a;
}
const ArchSpec kArchs[] = {
    llama_like("llama", RopeStyle::Adjacent),
    llama_like("qwen2", RopeStyle::NeoX),
    llama_like("qwen3", RopeStyle::NeoX),  // + per-head q/k RMSNorm (attn_q_norm / attn_k_norm), no qkv bias
    qwen3moe(),
    phi3(),
    chatglm(),
    chatglm1(),
    bert(),
    gpt2(),
    gemma2(),
    gemma3(),
    baichuan(),
    t5(),
    bart(),
    mbart(),
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
// The q.k scale as llama.cpp computes it for a file it made: 1 / sqrt(head_dim), except that Gemma 2
// and 3 scale by 1 / sqrt(n_embd / n_head) (integer division) in their 27B models, which llama.cpp
// recognises by the layer count alone (46 and 62 layers; transformers' query_pre_attn_scalar = 144
// and 168, not head_dim 128). llama.cpp defines {arch}.attention.scale (gguf-py's
// Keys.Attention.SCALE) but its gemma2/gemma3 graphs ignore it; we honour it, so that our converter
// can write a Gemma whose query_pre_attn_scalar the rule gets wrong (tools/convert/arch.py).
float attention_scale(const GGUFFile& f, const ModelConfig& c) {
  const std::string key = c.arch + ".attention.scale";
  if (f.find(key)) return float(positive_float(f, key, 1.0));
  if (c.spec.positions == Positions::RelativeBuckets) return 1.f;  // T5 folds 1/sqrt(d) into its weights' init
  const bool gemma_27b = (c.arch == "gemma2" && c.n_layer == 46) || (c.arch == "gemma3" && c.n_layer == 62);
  return 1.0f / std::sqrt(float(gemma_27b ? c.n_embd / c.n_head : c.head_dim));
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
             "' is not supported (none, linear, Llama-3 rope_freqs and LongRoPE rope_factors_long/short are)");
  }
  c.rope.attn_factor = float(positive_float(f, p + "rope.scaling.attn_factor", 1.0));
  c.n_ctx_orig = f.get_int(p + "rope.scaling.original_context_length", c.n_ctx_train);
  PE_CHECK(c.n_ctx_orig > 0, ModelFormatError, f.path(), ": ", p, "rope.scaling.original_context_length ",
           c.n_ctx_orig, " must be positive");
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
  c.sliding_window = f.get_int(p + "attention.sliding_window", 0);
  c.swa_pattern = f.get_int(p + "attention.sliding_window_pattern", spec->swa_pattern);
  PE_CHECK(c.swa_pattern >= 0 && c.swa_pattern <= 4096, ModelFormatError, f.path(), ": ", p,
           "attention.sliding_window_pattern ", c.swa_pattern, " is out of range");
  c.rope_swa = c.rope;
  if (const GGUFValue* b = f.find(p + "rope.freq_base_swa")) {
    (void)b;
    c.rope_swa.freq_base = float(f.get_float(p + "rope.freq_base_swa"));
    c.rope_swa.freq_scale = 1.f;  // the windowed layers' RoPE is not scaled (Gemma 3)
    PE_CHECK(c.rope_swa.freq_base > 0 && std::isfinite(c.rope_swa.freq_base), ModelFormatError, f.path(), ": ", p,
             "rope.freq_base_swa must be positive");
  } else if (spec->swa_pattern == 6) {
    c.rope_swa.freq_base = 10000.f;  // llama.cpp's gemma3 default for its local layers
    c.rope_swa.freq_scale = 1.f;
  }
  c.kq_scale = attention_scale(f, c);
  c.embd_scale = float(positive_float(f, p + "embedding_scale", spec->scale_embeddings ? std::sqrt(double(c.n_embd)) : 1.0));
  if (spec->alibi) {
    const std::string key = p + "attention.max_alibi_bias";
    if (f.find(key)) {
      c.alibi_max_bias = float(f.get_float(key));
      PE_CHECK(std::isfinite(c.alibi_max_bias) && c.alibi_max_bias >= 0 && c.alibi_max_bias <= 1024, ModelFormatError,
               f.path(), ": metadata key '", key, "' is ", c.alibi_max_bias, ": it must be in [0, 1024] (0: RoPE)");
    } else {
      // llama.cpp never reads the key for baichuan: 40 layers (13B) get ALiBi with max bias 8, 32 (7B)
      // RoPE, and any other count neither, which no Baichuan model is meant to run with.
      PE_CHECK(c.n_layer == 32 || c.n_layer == 40, UnsupportedModelError, f.path(), ": a ", c.arch, " model of ",
               c.n_layer, " layers without '", key, "': llama.cpp tells RoPE (32 layers, 7B) from ALiBi (40 layers, "
               "13B) by the layer count and would run this one with no position information; convert it with "
               "pyengine convert, which writes the key");
      c.alibi_max_bias = c.n_layer == 40 ? 8.f : 0.f;
    }
    if (c.alibi_max_bias > 0) c.alibi_slopes = alibi_slopes(int(c.n_head), c.alibi_max_bias);
  }
  c.attn_softcap = float(f.get_float(p + "attn_logit_softcapping", 0.0));
  c.final_softcap = float(f.get_float(p + "final_logit_softcapping", 0.0));
  PE_CHECK(c.attn_softcap >= 0 && c.final_softcap >= 0 && c.attn_softcap < 1e30f && c.final_softcap < 1e30f,
           ModelFormatError, f.path(), ": ", p, "attn/final_logit_softcapping must be non-negative and finite");
  PE_CHECK(c.sliding_window >= 0 && c.sliding_window <= (int64_t(1) << 30), ModelFormatError, f.path(), ": ", p,
           "attention.sliding_window ", c.sliding_window, " is out of range");
  PE_CHECK(c.sliding_window == 0 || spec->mask == Mask::Causal, UnsupportedModelError, f.path(), ": a sliding "
           "window on a ", c.arch, " model (only causal attention takes one)");
  c.prefix_length = f.get_int(p + "prefix_length", 0);
  PE_CHECK(c.prefix_length >= 0 && c.prefix_length <= (int64_t(1) << 16), ModelFormatError, f.path(), ": ", p,
           "prefix_length ", c.prefix_length, " is out of range [0, 65536]");
  // A prefix sits before the sequence's first position and is seen by every row: causal RoPE
  // decoders only (THUDM's ChatGLM2/3), where that is the whole story.
  PE_CHECK(c.prefix_length == 0 || (spec->family == Family::DecoderOnly && spec->mask == Mask::Causal &&
                                    spec->positions == Positions::Rope && c.sliding_window == 0),
           UnsupportedModelError, f.path(), ": ", p, "prefix_length (a P-Tuning v2 prefix) on a ", c.arch,
           " model: only causal decoders without a sliding window take one");
  if (spec->moe) {
    c.n_expert = f.get_int(p + "expert_count");
    c.n_expert_used = f.get_int(p + "expert_used_count");
    PE_CHECK(c.n_expert > 0 && c.n_expert <= 4096, ModelFormatError, f.path(), ": ", p, "expert_count ", c.n_expert,
             " is out of range [1, 4096]");
    PE_CHECK(c.n_expert_used > 0 && c.n_expert_used <= c.n_expert, ModelFormatError, f.path(), ": ", p,
             "expert_used_count ", c.n_expert_used, " must be in [1, expert_count ", c.n_expert, "]");
    // llama.cpp's default when the key is absent
    c.n_ff_exp = f.get_int(p + "expert_feed_forward_length", c.n_ff / c.n_expert_used);
    PE_CHECK(c.n_ff_exp > 0 && c.n_ff_exp <= (1 << 22), ModelFormatError, f.path(), ": ", p,
             "expert_feed_forward_length ", c.n_ff_exp, " is out of range");
    c.expert_weights_norm = f.get_bool(p + "expert_weights_norm", true);
    const int64_t gating = f.get_int(p + "expert_gating_func", 1);
    PE_CHECK(gating == 1, UnsupportedModelError, f.path(), ": ", p, "expert_gating_func ", gating,
             " is not supported (1: softmax is)");
  }
  if (spec->family == Family::EncoderDecoder) {
    c.n_enc_layer = c.n_layer;
    c.n_layer = f.get_int(p + "decoder_block_count", c.n_enc_layer);
    PE_CHECK(c.n_layer > 0 && c.n_layer <= 4096, ModelFormatError, f.path(), ": ", p, "decoder_block_count ",
             c.n_layer, " is out of range [1, 4096]");
    c.decoder_start_token = f.get_int(p + "decoder_start_token_id");
  }
  if (spec->positions == Positions::RelativeBuckets) {
    c.n_rel_buckets = f.get_int(p + "attention.relative_buckets_count");
    PE_CHECK(c.n_rel_buckets >= 4 && c.n_rel_buckets <= 4096 && c.n_rel_buckets % 2 == 0, ModelFormatError, f.path(),
             ": ", p, "attention.relative_buckets_count ", c.n_rel_buckets, " must be even and in [4, 4096]");
  }
  if (spec->family == Family::EncoderOnly) {
    const int64_t pooling = f.get_int(p + "pooling_type", int64_t(Pooling::Mean));
    PE_CHECK(pooling >= 0 && pooling <= 4, UnsupportedModelError, f.path(), ": ", p, "pooling_type ", pooling,
             " is not supported (0 none, 1 mean, 2 cls, 3 last, 4 rank)");
    c.pooling = Pooling(pooling);
  }
  return c;
}

}  // namespace pe
