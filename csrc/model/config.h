// A model architecture as data: the flags that distinguish one decoder-only transformer from
// another, plus the hyper-parameters read from GGUF metadata (llama.cpp's keys).
#pragma once
#include <string>

#include "gguf.h"
#include "ops/activation.h"
#include "ops/rope.h"

namespace pe {

enum class NormType { RMS, Layer };

// What the GGUF architecture name implies (one row per architecture in config.cpp).
struct ArchSpec {
  const char* name;
  NormType norm;
  RopeStyle rope;
  Activation act;
  bool gated_ffn;        // SwiGLU-style gate * up, or a plain act(up)
  bool fused_gate_up;    // ffn_up holds [gate; up] stacked (ChatGLM2+): 2*n_ff rows
  // ChatGLM-6B: each residual branch is added to its *normalized* input times {arch}.residual_scale
  // (h = ln(x)*alpha + f(ln(x))) instead of to x.
  bool residual_from_norm = false;
  // ChatGLM-6B's 2-D RoPE: the first rope.dimension_count dims of each head rotate by the position id,
  // the next as many by the block position id. The prompt up to the BOS token (<sop>, after [gMASK])
  // attends bidirectionally; from BOS on, the position id stays at the mask token's index and the block
  // position counts 1, 2, ... (THUDM's get_position_ids / get_masks).
  bool rope_2d = false;
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
  float norm_eps = 1e-5f;
  RopeParams rope;  // freq_factors filled in by the model if it has rope_freqs.weight
  float residual_scale = 1.f;    // residual_from_norm: alpha
  int64_t prefix_end_token = -1;  // rope_2d: the token that ends the bidirectional prefix (BOS, <sop>)
  int64_t mask_token = -1;        // rope_2d: the mask token ([gMASK]) whose index is the generation position id
};

// Supported architecture names, comma-separated (for error messages).
std::string supported_architectures();
// Reads general.architecture and the hyper-parameters; throws UnsupportedModelError / ModelFormatError.
ModelConfig read_config(const GGUFFile& f);

}  // namespace pe
