// A loaded model: its configuration and its weights, viewed in place in the GGUF mapping.
#pragma once
#include <memory>
#include <vector>

#include "gguf.h"
#include "model/config.h"
#include "tensor.h"

namespace pe {

// A 1-D parameter (norm weight, bias) converted to F32 at load: they are tiny and the file may
// store them in any float type.
using Vec = std::vector<float>;
// The vector as a one-row F32 tensor; an empty tensor for an absent (empty) vector.
inline Tensor tensor_of(const Vec& v) { return v.empty() ? Tensor{} : f32_vector(v.data(), int64_t(v.size())); }

struct Linear {
  Tensor w{};
  Vec b;  // empty: no bias
  bool present() const { return w.data != nullptr; }
};

struct Layer {
  Vec attn_norm, attn_norm_b;
  Linear wqkv;  // fused [q; k; v] rows (ChatGLM); when present, wq/wk/wv are absent
  Linear wq, wk, wv, wo;
  Vec ffn_norm, ffn_norm_b;
  Linear w_gate, w_up, w_down;  // w_gate absent for non-gated or fused gate/up FFNs
};

// A stack of transformer blocks and the norm after its last block.
struct Stack {
  std::vector<Layer> layers;
  Vec output_norm, output_norm_b;
};

class Model {
 public:
  explicit Model(const std::string& path);
  const ModelConfig& config() const { return cfg_; }
  const GGUFFile& file() const { return *file_; }

  ModelConfig cfg_;
  std::shared_ptr<GGUFFile> file_;
  Tensor tok_embd{};
  Stack decoder;
  Linear output;  // the LM head; the token embedding when tied
  Vec rope_freqs;
};

}  // namespace pe
