// The forward pass of each model family over one plan of rows, which may come from many sequences,
// with its blocks split between devices (the first ones on the CPU, the rest on a GPU).
#pragma once
#include <cstdint>
#include <vector>

#include "kv_cache.h"
#include "model/input_stats.h"
#include "model/model.h"
#include "ops/attention.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "tensor.h"

namespace pe {

// One forward pass's rows as the ops take them (I32 row metadata, host vectors).
struct RowPlan {
  std::vector<int32_t> token, seq, rope_pos, rope_pos2, key_begin, key_end, slot, key_begin_window;
  std::vector<int32_t> logit_rows;  // rows whose logits are wanted, ascending
  // P-Tuning v2: the cache slots of the prefix of each sequence that starts in this pass
  // (ModelConfig::prefix_length slots per sequence, positions 0.. of the sequence's cache).
  std::vector<int32_t> prefix_slot;
  // Family::EncoderDecoder's decoder rows: the encoder positions [cross_key_begin, cross_key_end) of the
  // row's sequence in the cross-attention cache (its whole input).
  std::vector<int32_t> cross_key_begin, cross_key_end;

  int64_t size() const { return int64_t(token.size()); }
  void clear();
};

// The plan's vectors as I32 tensors on one device (host views on the CPU, one upload on a GPU).
struct RowTensors {
  Tensor token, seq, rope_pos, rope_pos2, key_begin, key_end, slot, logit_rows, key_begin_window, prefix_slot,
      cross_key_begin, cross_key_end;
};

// The mixture-of-experts op's parameters of a model (ModelConfig::n_expert > 0).
MoEParams moe_params(const ModelConfig& c);

// Scratch of a context on one device, grown to the largest pass seen.
struct Activations {
  Buffer x, xn, qkv, att, ff_a, ff_b, out, rows;
  Buffer top;  // a GPU head's top_logits requests and results (LogitsSummary)
  MoEScratch moe;    // mixture-of-experts FFNs: the op's scratch, and the FFN's output
  Buffer moe_out;
  InputStats* input_stats = nullptr;  // set while collecting an imatrix: every linear layer adds its input
  void reserve(const ModelConfig& c, int64_t rows, Device device);
  RowTensors upload(Executor& ex, const RowPlan& plan);
};

// Consecutive blocks [first, first + layers.size()) that run on one device, with that device's
// executor, KV cache (its layer i holds block first + i) and scratch.
struct StackPart {
  Executor* ex = nullptr;
  std::vector<const Layer*> layers;
  int64_t first = 0;
  KVCache* kv = nullptr;
  // An encoder's input runs through its blocks in one pass, so each block's keys and values are done with
  // when the next block starts: all blocks store them in layer 0 of kv (a cache of one layer).
  bool one_kv_layer = false;
  Activations* act = nullptr;
  // Positions::RelativeBuckets: the stack's self-attention bias (its table null otherwise).
  PositionBias bias;
  // Family::EncoderDecoder's decoder: the keys and values of the encoder's output, a layer per block.
  const KVCache* cross = nullptr;
  const char* tensor_prefix = "";  // GGUF prefix of the stack's block tensors ("enc.", "dec."), for messages
  // An encoder's pass, whose rows are one input alone, may round as MatmulRounding::Bf16 (ops/matmul.h).
  MatmulRounding rounding = MatmulRounding::Int8;
};

// RoPE as one context runs it (llama.cpp's cparams): of the global layers and of the windowed ones,
// with LongRoPE's factor set chosen by the context's n_ctx (Model::rope).
struct ContextRope {
  RopeParams global, windowed;
};

// Sampling's view of a pass (Context::decode_top): instead of the wanted rows' logits, their
// top_logits (ops/top_logits.h) come back to the host; a GPU head's logits stay in its
// Activations::out. Host arrays, one entry (or row) per wanted row of the pass.
struct LogitsSummary {
  const int32_t* k = nullptr;
  const float* inv_t = nullptr;
  int k_max = 1;
  int32_t* ids = nullptr;   // [rows x k_max]
  float* values = nullptr;  // [rows x k_max]
  float* stats = nullptr;   // [rows x 2]
};

// The decoder-only family (llama, qwen2, chatglm, chatglm1): embeds the rows' tokens (on the CPU),
// runs the parts' blocks in order (each appends the rows' keys and values to its cache and attends
// over their sequences), and writes the logits of rows.logit_rows into `out` (host F32
// [logit_rows x n_vocab]; empty: none), or with `hidden` their final hidden states after the
// output norm (F32 [logit_rows x n_embd]: embeddings). `cpu` is the CPU part, which does the
// embedding lookup (and adds the stack's `input`) even when it has no blocks; `head` (the output norm
// and LM head) runs on `head_part`'s device. With `summary`, the logits go to `out` only when the head
// is on the CPU (a GPU head's stay in its scratch) and their top_logits go to the summary's arrays.
void forward_decoder(const Model& model, const StackPart& cpu, const std::vector<StackPart>& parts,
                     const StackPart& head_part, const StackInput& input, const Head& head, const RowPlan& rows,
                     const ContextRope& rope, const Tensor& out, bool hidden = false,
                     const LogitsSummary* summary = nullptr);

}  // namespace pe
