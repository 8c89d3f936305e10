// A loaded model (weights in the GGUF mapping) and an inference context (KV cache, scratch).
#pragma once
#include <memory>
#include <vector>

#include "gguf.h"
#include "model/config.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "threadpool.h"

namespace pe {

// A 1-D parameter (norm weight, bias) converted to F32 at load: they are tiny and the file may
// store them in any float type.
using Vec = std::vector<float>;

struct Linear {
  WeightView w{};
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

class Model {
 public:
  explicit Model(const std::string& path);
  const ModelConfig& config() const { return cfg_; }
  const GGUFFile& file() const { return *file_; }

  ModelConfig cfg_;
  std::shared_ptr<GGUFFile> file_;
  WeightView tok_embd{};
  Vec output_norm, output_norm_b;
  Linear output;  // the token embedding when tied
  Vec rope_freqs;
  std::vector<Layer> layers;
};

class Context {
 public:
  // kv_type: GGMLType::F16 (default) or F32.
  Context(std::shared_ptr<const Model> model, int64_t n_ctx, int n_threads, int64_t n_batch = 512,
          GGMLType kv_type = GGMLType::F16);

  // Evaluates `n` tokens at positions n_past().., appending them to the KV cache.
  // logits: null, or room for n_vocab floats (last token) or n * n_vocab floats (all_logits).
  void eval(const int32_t* tokens, int64_t n, float* logits, bool all_logits);
  int64_t n_past() const { return n_past_; }
  // Forget everything after the first n tokens (n <= n_past).
  void truncate(int64_t n);
  int64_t n_ctx() const { return n_ctx_; }
  int n_threads() const { return pool_.size(); }
  const Model& model() const { return *model_; }

 private:
  // logits: rows first_logit.. of the chunk (none when null).
  void forward_chunk(const int32_t* tokens, int64_t n, float* logits, int64_t first_logit);
  void reserve_rows(int64_t rows);

  std::shared_ptr<const Model> model_;
  int64_t n_ctx_;
  int64_t n_batch_;
  int64_t n_past_ = 0;
  ThreadPool pool_;
  std::vector<uint8_t> k_cache_, v_cache_;
  std::vector<KVLayer> kv_;
  // Scratch, n_batch rows each.
  std::vector<float> x_, xn_, qkv_, attn_, ff_a_, ff_b_;
  std::vector<int32_t> pos_, block_pos_;
  // 2-D RoPE models (ChatGLM-6B): the tokens in the cache, and where their bidirectional prefix ends
  // (the index of the BOS token, -1 until one is seen) and the mask token sits.
  std::vector<int32_t> history_;
  int64_t prefix_len_ = -1;
  int64_t mask_pos_ = -1;
};

}  // namespace pe
