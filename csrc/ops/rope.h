// Rotary position embedding, in place.
#pragma once
#include <cstdint>

#include "threadpool.h"

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
  const float* freq_factors = nullptr;  // per pair divisors (llama.cpp's rope_freqs, Llama-3 scaling), or null
};

// x: n_tokens rows, `token_stride` floats apart, each holding n_heads heads of head_dim floats.
// Head h of token t is rotated by angle pos[t] * theta_i.
void rope(float* x, int64_t n_tokens, int64_t token_stride, int n_heads, int head_dim, const int32_t* pos,
          const RopeParams& p, ThreadPool& pool);

}  // namespace pe
