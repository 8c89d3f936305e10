// A model architecture as data: its family, the flags that tell one transformer of a family from
// another, how it places tokens (positions) and which keys a token sees (mask), plus the
// hyper-parameters read from GGUF metadata (llama.cpp's keys).
#pragma once
#include <string>
#include <vector>

#include "gguf.h"
#include "ops/activation.h"
#include "ops/norm.h"
#include "ops/rope.h"

namespace pe {

// Which stacks a model has and how they connect; one block function per family (model/forward.cpp).
enum class Family {
  DecoderOnly,  // one causal stack over a growing KV cache, LM head on top (llama, qwen2, chatglm)
  EncoderOnly,  // one bidirectional stack over the whole input, hidden states out (bert)
  // A bidirectional encoder stack run once over a sequence's input (Context::encode), and a causal
  // decoder stack whose blocks also attend to the encoder's output (cross-attention), LM head on top (t5).
  EncoderDecoder,
};

// How a token's place in its sequence becomes its position encoding.
enum class Positions {
  Rope,    // RoPE at the token's index in the sequence
  Rope2D,  // ChatGLM-6B: one RoPE half by position id, the other by block position (THUDM's get_position_ids)
  Learned, // a learned table of absolute positions added to the token embedding (BERT)
  // No position encoding of the tokens: each self-attention adds a learned bias per head and bucket of
  // key-query distance (T5's attn_rel_b; see PositionBias in ops/attention.h)
  RelativeBuckets,
};

// Which keys of its sequence a token sees.
enum class Mask {
  Causal,    // itself and everything before it
  PrefixLM,  // ChatGLM-6B: the prompt up to the prefix-end token (BOS, <sop>) sees the whole prompt
             // (bidirectional); from there on, causal
  Bidirectional,  // every token of the sequence (an encoder's input, evaluated whole)
};

// How an encoder's per-token hidden states become one vector (llama.cpp's pooling_type values).
// Rank: a classification head on the [CLS] row (pyengine/llm.py classify()).
enum class Pooling { None = 0, Mean = 1, CLS = 2, Last = 3, Rank = 4 };

// What the GGUF architecture name implies (one row per architecture in config.cpp).
struct ArchSpec {
  const char* name;
  Family family = Family::DecoderOnly;
  NormType norm = NormType::RMS;
  RopeStyle rope = RopeStyle::Adjacent;
  Activation act = Activation::SiLU;
  bool gated_ffn = true;           // act(gate) * up, or a plain act(up)
  bool fused_gate_up = false;      // ffn_up holds [gate; up] stacked (ChatGLM2+): 2*n_ff rows
  // ChatGLM-6B: each residual branch is added to its *normalized* input times {arch}.residual_scale
  // (h = ln(x)*alpha + f(ln(x))) instead of to x.
  bool residual_from_norm = false;
  Positions positions = Positions::Rope;
  Mask mask = Mask::Causal;
  // Post-norm blocks (BERT, BART): x = norm(x + f(x)) after each sublayer, instead of x + f(norm(x)).
  bool post_norm = false;
  // A LayerNorm of the summed embeddings (token_embd_norm; BART's per stack) before the first block (BERT, BART).
  bool embedding_norm = false;
  // GGUF names of the two per-block norms (llama.cpp's: BERT's sit after the sublayers).
  const char* attn_norm_name = "attn_norm";
  const char* ffn_norm_name = "ffn_norm";
  // Token embeddings times sqrt(n_embd) (Gemma), unless {arch}.embedding_scale says otherwise (BART's
  // scale_embedding; see ModelConfig::embd_scale).
  bool scale_embeddings = false;
  // A tied LM head sees the hidden states times n_embd^-0.5 (transformers' T5; llama.cpp's t5 omits it).
  bool tied_head_scale = false;
  // Every linear layer and norm of a block has a bias (BART): a file without one is refused, by name, instead
  // of run as if it were zero (elsewhere a bias is used where the file has one).
  bool block_biases = false;
  // Mixture-of-experts FFNs (Qwen3-MoE): a block with a router (ffn_gate_inp) sends each row through its
  // {arch}.expert_used_count best of {arch}.expert_count SwiGLU experts (ffn_{gate,up,down}_exps, of
  // {arch}.expert_feed_forward_length); a block without one has the dense FFN.
  bool moe = false;
  // With a sliding window, which layers are windowed: 0, every layer (Mistral); p > 0, all but every
  // p-th (layer l is global when l % p == p - 1: Gemma 2's p = 2, Gemma 3's 6). Overridden by
  // {arch}.attention.sliding_window_pattern.
  int swa_pattern = 0;
  // The architecture may use ALiBi instead of RoPE (llama.cpp's baichuan: Baichuan-13B): the file's
  // {arch}.attention.max_alibi_bias decides (0: RoPE); without it, llama.cpp's rule by model size.
  bool alibi = false;
  // GGUF name prefixes of the decoder's and the encoder's blocks and output norm ("dec.blk.N.", "enc.output_norm"
  // for t5), and the name of the attention's output projection.
  const char* decoder_prefix = "";
  const char* encoder_prefix = "";
  const char* attn_out_name = "attn_output";
  // The FFN's form follows the file (llama.cpp's t5): with ffn_gate tensors, act_gated(gate) * up (T5 v1.1,
  // flan-T5, mT5: tanh GELU), else act(up) (T5 v1.0: ReLU).
  bool ffn_from_tensors = false;
  Activation act_gated = Activation::GELU;
};

struct ModelConfig {
  ArchSpec spec;
  std::string arch;
  int64_t n_vocab = 0;
  int64_t n_embd = 0;
  int64_t n_layer = 0;
  int64_t n_head = 0;
  int64_t n_head_kv = 0;
  int64_t head_dim = 0;
  int64_t n_ff = 0;
  int64_t n_ctx_train = 0;
  // The context the model was first trained at ({arch}.rope.scaling.original_context_length, default
  // n_ctx_train): LongRoPE's long factors serve contexts longer than it.
  int64_t n_ctx_orig = 0;
  float norm_eps = 1e-5f;
  // The token embeddings' factor, before positions are added: {arch}.embedding_scale (llama.cpp's key), else
  // sqrt(n_embd) with ArchSpec::scale_embeddings, else 1.
  float embd_scale = 1.f;
  RopeParams rope;  // freq_factors filled in by the model if it has rope_freqs.weight
  float residual_scale = 1.f;     // residual_from_norm: alpha
  int64_t prefix_end_token = -1;  // Mask::PrefixLM: the token that ends the bidirectional prefix (BOS, <sop>)
  int64_t mask_token = -1;        // Positions::Rope2D: the mask token ([gMASK]) whose index is the generation position id
  Pooling pooling = Pooling::None;  // encoders: {arch}.pooling_type
  int64_t sliding_window = 0;       // causal rows see their last `sliding_window` positions (0: all): Mistral
  float attn_softcap = 0.f;         // {arch}.attn_logit_softcapping (Gemma 2; 0: none)
  float final_softcap = 0.f;        // {arch}.final_logit_softcapping (Gemma 2; 0: none)
  int64_t swa_pattern = 0;          // see ArchSpec::swa_pattern
  RopeParams rope_swa;              // RoPE of windowed layers (Gemma 3: base {arch}.rope.freq_base_swa, unscaled)
  // P-Tuning v2 (ChatGLM2/3's fine-tuning): {arch}.prefix_length learned past keys and values per layer
  // (tensors blk.N.prefix_k / blk.N.prefix_v) that every sequence's cache starts with; 0: none.
  int64_t prefix_length = 0;
  // ArchSpec::moe: the experts (n_expert 0: none), and whether the chosen experts' weights are
  // renormalised to sum to 1 ({arch}.expert_weights_norm, default true as llama.cpp's qwen3moe).
  int64_t n_expert = 0, n_expert_used = 0, n_ff_exp = 0;
  bool expert_weights_norm = true;
  // Scale of q.k before the softmax: {arch}.attention.scale when the file has it, else llama.cpp's rule
  // for the architecture (1 / sqrt(head_dim); Gemma 2/3 27B: 1 / sqrt(n_embd / n_head)).
  float kq_scale = 0.f;
  // ALiBi instead of RoPE: one slope per query head from {arch}.attention.max_alibi_bias (empty: none).
  float alibi_max_bias = 0.f;
  std::vector<float> alibi_slopes;
  // Family::EncoderDecoder: the encoder's blocks (n_layer counts the decoder's: {arch}.decoder_block_count,
  // default block_count), the token the decoder starts from, and the relative position buckets.
  int64_t n_enc_layer = 0;
  int64_t decoder_start_token = -1;
  int64_t n_rel_buckets = 0;  // {arch}.attention.relative_buckets_count (Positions::RelativeBuckets)
  bool windowed(int64_t layer) const {
    return sliding_window > 0 && (swa_pattern == 0 || layer % swa_pattern != swa_pattern - 1);
  }
  // The window every layer attends within, so that keys behind it can be dropped from the cache (0: some
  // layer sees every key, or a P-Tuning prefix must stay).
  int64_t kv_window() const { return sliding_window > 0 && swa_pattern == 0 && prefix_length == 0 ? sliding_window : 0; }
};

// Supported architecture names, comma-separated (for error messages).
std::string supported_architectures();
// Reads general.architecture and the hyper-parameters; throws UnsupportedModelError / ModelFormatError.
ModelConfig read_config(const GGUFFile& f);

}  // namespace pe
