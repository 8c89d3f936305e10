// The forward pass of each model family over one plan of rows, which may come from many sequences.
#pragma once
#include <cstdint>
#include <vector>

#include "kv_cache.h"
#include "model/model.h"
#include "tensor.h"

namespace pe {

// One forward pass's rows as the ops take them (I32 row metadata; host arrays on the CPU backend).
struct RowPlan {
  std::vector<int32_t> token, seq, rope_pos, rope_pos2, key_begin, key_end, slot;
  std::vector<int32_t> logit_rows;  // rows whose logits are wanted, ascending

  int64_t size() const { return int64_t(token.size()); }
  void clear();
  static Tensor i32(const std::vector<int32_t>& v) {
    return Tensor{GGMLType::I32, const_cast<int32_t*>(v.data()), 1, int64_t(v.size()), v.size() * sizeof(int32_t)};
  }
};

// Activation scratch of a context, on its executor's device, grown to the largest pass seen.
struct Activations {
  Buffer x, xn, qkv, att, ff_a, ff_b;
  void reserve(const ModelConfig& c, int64_t rows, Device device);
};

// The decoder-only family (llama, qwen2, chatglm, chatglm1): embeds the rows' tokens, runs the block
// stack (each layer appends the rows' keys and values to `kv` and attends over their sequences), and
// writes the logits of rows.logit_rows into `out` (F32 [logit_rows x n_vocab]; empty: none), or with
// `hidden` their final hidden states after the output norm (F32 [logit_rows x n_embd]: embeddings).
void forward_decoder(Executor& ex, const Model& model, KVCache& kv, const RowPlan& rows, Activations& a,
                     const Tensor& out, bool hidden = false);

}  // namespace pe
