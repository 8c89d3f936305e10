// A loaded model: its configuration and its weights, viewed in place in the GGUF mapping.
#pragma once
#include <deque>
#include <memory>
#include <mutex>
#include <vector>

#include "executor.h"
#include "ops/attention.h"
#include "gguf.h"
#include "model/config.h"
#include "ops/moe.h"
#include "tensor.h"

namespace pe {

// A 1-D parameter (norm weight, bias) converted to F32 at load: they are tiny and the file may
// store them in any float type. Layers see them as one-row F32 tensors.
using Vec = std::vector<float>;

struct Linear {
  Tensor w{};
  Tensor b{};  // empty: no bias
  bool present() const { return w.data != nullptr; }
};

struct Layer {
  Tensor attn_norm, attn_norm_b;  // empty tensors for absent parameters
  Linear wqkv;  // fused [q; k; v] rows (ChatGLM, Phi-3, every device copy that can); when present, wq/wk/wv are absent
  Linear wq, wk, wv, wo;
  Tensor attn_q_norm, attn_k_norm;  // per-head RMSNorm of q and k before RoPE (Qwen3), when present
  Tensor attn_post_norm, ffn_post_norm;  // norms of the sublayers' outputs before the residual add (Gemma 2)
  Tensor ffn_norm, ffn_norm_b;
  Linear w_gate, w_up, w_down;  // w_gate absent for non-gated FFNs and when w_up holds [gate; up] rows
  Experts experts;  // a mixture-of-experts FFN instead (ArchSpec::moe), when its router is present
  bool moe() const { return !experts.router.empty(); }
  // P-Tuning v2: the learned past keys and values every sequence starts with, F32
  // [prefix_length x n_head_kv * head_dim] (keys as stored: THUDM's prefix carries no RoPE).
  Tensor prefix_k, prefix_v;
  // Cross-attention (an encoder-decoder's decoder blocks): an attention whose queries come from the decoder
  // and whose keys and values are cross_k/cross_v of the encoder's output (Context::encode), normed before
  // (T5, mBART) or after the residual add (BART) as the block's other sublayers.
  Tensor cross_norm, cross_norm_b;
  Linear cross_q, cross_k, cross_v, cross_o;

  // Every tensor of the block (absent ones too, as empty tensors), for copying a layer to a device.
  std::vector<Tensor*> tensors();
};

// The output norm and the LM head on top of the last block.
struct Head {
  Tensor output_norm, output_norm_b;
  Linear output;  // the token embedding when tied
  float output_scale = 1.f;  // ArchSpec::tied_head_scale (T5): d_model^-0.5 on the hidden states before a tied head
  std::vector<Tensor*> tensors();
};

// What a stack adds to its token embeddings before the first block (Positions::Learned, ArchSpec::embedding_norm):
// the absolute position table [positions x n_embd], and the LayerNorm of the sum (BERT's token_embd_norm; BART's
// layernorm_embedding, one per stack: enc./dec.token_embd_norm). Empty tensors for what the model does not have.
struct StackInput {
  Tensor position_embd, norm, norm_b;
};

// A stack of transformer blocks, its input and its head (an encoder's: its output norm only, if any).
struct Stack {
  std::vector<Layer> layers;
  StackInput input;
  Head head;
  // Positions::RelativeBuckets: the stack's position bias table, F32 [n_head x n_rel_buckets], stored
  // with layer 0 (llama.cpp's {enc,dec}.blk.0.attn_rel_b) and shared by every layer.
  Vec rel_bias;
};

// The relative position bias of a stack's self-attention (PositionBias without the rows' positions).
PositionBias position_bias(const ModelConfig& c, const Stack& s, bool bidirectional);

// The blocks (and, when all of them, the head) copied to a GPU: llama.cpp's n_gpu_layers counts
// from the top, so the last n_layers blocks run there and the first ones on the CPU.
struct GpuLayers {
  int n_layers = 0;
  bool head = false;          // output norm and LM head on the GPU too (all blocks offloaded)
  std::vector<Layer> layers;  // device copies of blocks [n_layer - n_layers, n_layer)
  Head head_weights;
  std::shared_ptr<Executor> executor;  // the GPU stream every context of this model uses
  std::vector<Buffer> memory;
  size_t bytes = 0;
};
class Model {
 public:
  // use_mmap: weights used in place in a shared mapping of the file (default) or in a private copy.
  explicit Model(const std::string& path, bool use_mmap = true);
  const ModelConfig& config() const { return cfg_; }
  const GGUFFile& file() const { return *file_; }

  ModelConfig cfg_;
  std::shared_ptr<GGUFFile> file_;
  Tensor tok_embd{};  // stays in the mapping (on the CPU) even when every block is offloaded
  // BERT: token type 0's embedding as F32 (every token is type 0: one sentence per input), added with the
  // positions (the stacks' StackInput).
  Tensor token_type{};
  Stack decoder;
  Stack encoder;  // Family::EncoderDecoder
  Vec rope_freqs;
  Vec rope_long, rope_short;  // LongRoPE's factor sets (rope_factors_long/short.weight), or empty

  // The RoPE of global (or windowed) layers as a context of n_ctx positions per sequence runs it:
  // with LongRoPE, the long factors when n_ctx exceeds the original training context, else the short.
  RopeParams rope(int64_t n_ctx, bool windowed) const;

  // Copies the last n_gpu_layers blocks (and the head, when that is all of them) to the GPU; once,
  // before any context is created. n_gpu_layers is clamped to n_layer.
  void offload(int n_gpu_layers);
  const GpuLayers& gpu() const { return gpu_; }
  // Bytes a block's / the head's weights take on a device (as offload() lays them out).
  size_t layer_bytes(int64_t layer) const;
  size_t head_bytes() const;
  // Copies the matmul weights that run on the CPU into the panel layout of the kernels in use
  // (cpu/panels.h), all in one buffer in huge pages, once, the work on ex's threads; the file's pages
  // of each copied tensor are then released (a shared mapping). The first context calls it, after any offload(): the copies change
  // no result, only how fast the kernels read.
  void pack_cpu_weights(Executor& ex) const;
  // Owns v for the model's lifetime; returns a one-row tensor of it (empty for an empty v), or with
  // `rows`, an F32 [rows x v.size() / rows] tensor.
  Tensor keep(Vec v, int64_t rows = 1);

 private:
  std::deque<Vec> vecs_;
  GpuLayers gpu_;
  mutable std::once_flag packed_;
  mutable Buffer panel_memory_;  // every CPU tensor's panel copy, one after another
};

}  // namespace pe
