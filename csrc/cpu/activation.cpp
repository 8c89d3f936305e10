#include <cmath>

#include "cpu/ops.h"

namespace pe::cpu {

namespace {
inline float silu(float x) { return x / (1.f + std::exp(-x)); }
// tanh approximation of GELU, as ggml, ChatGLM-6B and GPT-2 use.
inline float gelu(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  return 0.5f * x * (1.f + std::tanh(kSqrt2OverPi * x * (1.f + 0.044715f * x * x)));
}
inline float gelu_erf(float x) { return 0.5f * x * (1.f + std::erf(x * 0.7071067811865476f)); }
inline float relu(float x) { return x > 0.f ? x : 0.f; }

// Calls body(f) with the activation as a function object, so the switch is outside the element loops
// and a loop as simple as ReLU's compiles to vector max instructions.
template <class Body>
void with_activation(Activation act, Body&& body) {
  switch (act) {
    case Activation::SiLU: return body([](float x) { return silu(x); });
    case Activation::GELU: return body([](float x) { return gelu(x); });
    case Activation::ReLU: return body([](float x) { return relu(x); });
    default: return body([](float x) { return gelu_erf(x); });
  }
}
}  // namespace

void gated_activation(Executor& ex, Activation act, const Tensor& gate, const Tensor& up, const Tensor& out) {
  const int64_t d = gate.cols;
  with_activation(act, [&](auto f) {
    ex.pool().for_range(gate.rows, 2, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        const float* g = gate.row(r);
        const float* u = up.row(r);
        float* o = out.row(r);
        for (int64_t i = 0; i < d; i++) o[i] = f(g[i]) * u[i];
      }
    });
  });
}

void activation(Executor& ex, Activation act, const Tensor& x) {
  const int64_t d = x.cols;
  with_activation(act, [&](auto f) {
    ex.pool().for_range(x.rows, 2, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        float* v = x.row(r);
        for (int64_t i = 0; i < d; i++) v[i] = f(v[i]);
      }
    });
  });
}

}  // namespace pe::cpu
