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
};

// Supported architecture names, comma-separated (for error messages).
std::string supported_architectures();
// Reads general.architecture and the hyper-parameters; throws UnsupportedModelError / ModelFormatError.
ModelConfig read_config(const GGUFFile& f);

}  // namespace pe
