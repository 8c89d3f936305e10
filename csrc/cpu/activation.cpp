#include "ops/activation.h"

#include <cmath>

namespace pe {

namespace {
inline float silu(float x) { return x / (1.f + std::exp(-x)); }
// tanh approximation of GELU, as ggml, ChatGLM-6B and GPT-2 use.
inline float gelu(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.f + std::tanh(kSqrt2OverPi * x * (1.f + 0.044715f * x * x)));
}

}  // namespace

void gated_activation(Activation act, const float* gate, const float* up, float* out, int64_t n, int64_t d,
                      int64_t stride, ThreadPool& pool) {
  pool.for_range(n, 2, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* g = gate + r * stride;
      const float* u = up + r * stride;
      float* o = out + r * stride;
      if (act == Activation::SiLU)
        for (int64_t i = 0; i < d; i++) o[i] = silu(g[i]) * u[i];
      else
        for (int64_t i = 0; i < d; i++) o[i] = gelu(g[i]) * u[i];
    }
  });
}

void activation_inplace(Activation act, float* x, int64_t n, int64_t d, int64_t stride, ThreadPool& pool) {
  pool.for_range(n, 2, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* v = x + r * stride;
      if (act == Activation::SiLU)
        for (int64_t i = 0; i < d; i++) v[i] = silu(v[i]);
      else
        for (int64_t i = 0; i < d; i++) v[i] = gelu(v[i]);
    }
  });
}

void add_bias(float* y, const float* b, int64_t n, int64_t d, int64_t stride) {
  for (int64_t r = 0; r < n; r++)
    for (int64_t i = 0; i < d; i++) y[r * stride + i] += b[i];
}

}  // namespace pe
