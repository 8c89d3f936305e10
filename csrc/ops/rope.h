// Rotary position embedding, in place.
#pragma once
#include "executor.h"
#include "tensor.h"

namespace pe {

enum class RopeStyle {
  Adjacent,  // rotate pairs (x[2i], x[2i+1]): GPT-J / ggml "NORM"; llama.cpp's llama after its Q/K permutation
  NeoX,      // rotate pairs (x[i], x[i + n_dims/2]): GPT-NeoX / HF rotate_half; qwen2
};

struct RopeParams {
  RopeStyle style = RopeStyle::Adjacent;
  int n_dims = 0;                       // rotated dims per head (<= head_dim); the rest pass through
  float freq_base = 10000.f;
  float freq_scale = 1.f;               // linear scaling: position * freq_scale
  // Per pair divisors of the frequencies, or null: llama.cpp's rope_freqs (Llama-3 scaling) or one of
  // LongRoPE's rope_factors_long / rope_factors_short (Phi-3 128k). Host memory, n_dims / 2 floats.
  const float* freq_factors = nullptr;
  float attn_factor = 1.f;              // cos and sin times this ({arch}.rope.scaling.attn_factor, LongRoPE)
};

// x: F32 [n_tokens x n_heads * head_dim] (a column range of a fused QKV is fine); `first_dim` skips
// that many dims of every head before the rotated ones (ChatGLM-6B's second RoPE half).
// pos: I32 [1 x n_tokens]; head h of token t is rotated by angle pos[t] * theta_i.
void rope(Executor& ex, const Tensor& x, int n_heads, int head_dim, int first_dim, const Tensor& pos,
          const RopeParams& p);

}  // namespace pe
