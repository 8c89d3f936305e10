#include <cmath>
#include <cstring>

#include "cpu/ops.h"
#include "cpu/vec_clones.h"

namespace pe::cpu {

namespace {
inline float gelu_erf(float x) { return 0.5f * x * (1.f + std::erf(x * 0.7071067811865476f)); }
inline float relu(float x) { return x > 0.f ? x : 0.f; }

// SiLU and GELU (tanh form) 8 elements at a time, as x * sigmoid(z): z = x for SiLU, and for GELU
// 0.5 x (1 + tanh(y)) = x sigmoid(2y) with y = sqrt(2/pi) (x + 0.044715 x^3) (ggml's, GPT-2's, Gemma's).
// e = e^-|z| (exp_nonpositive8, cpu/vec_clones.h), sigmoid = 1 / (1 + e) for
// z >= 0 and e / (1 + e) below. libm's scalar expf per element was ~5 % of a batched decode step. Written
// with GCC vector types (cpu/vec_clones.h), compiled for x86-64-v4 and v3 as well as the baseline, as the
// quantizer searches are; a row's tail goes through the same code in a padded block, so every element
// gets the same arithmetic. NaN stays NaN.

// 8 elements at a time (VF8: one register in the AVX2 copy too, cpu/vec_clones.h).
__attribute__((always_inline)) inline VF8 times_sigmoid8(VF8 x, VF8 z) {
  const VF8 e = exp_nonpositive8(-(VF8)((VI8)z & 0x7fffffff));
  const VI8 pos = (VI8)(z >= 0.f);
  const VF8 num = (VF8)((pos & (VI8)(VF8{} + 1.f)) | (~pos & (VI8)e));
  return x * (num / (1.f + e));
}

__attribute__((always_inline)) inline VF8 sigmoid_act8(VF8 x, bool gelu) {
  if (!gelu) return times_sigmoid8(x, x);
  return times_sigmoid8(x, 1.5957691216057308f * x * (1.f + 0.044715f * x * x));  // 2 sqrt(2/pi)
}

// o[i] = act(g[i]) * u[i] (act(g[i]) where u is null) for SiLU, or GELU when `gelu`.
PE_VEC_CLONES void sigmoid_act_row(const float* g, const float* u, float* o, int64_t n, bool gelu) {
  float xb[8], ub[8];
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t w = n - i < 8 ? n - i : 8;
    VF8 x, v = VF8{} + 1.f;
    if (w == 8) {
      std::memcpy(&x, g + i, sizeof x);
      if (u) std::memcpy(&v, u + i, sizeof v);
    } else {  // the tail, padded
      std::memset(xb, 0, sizeof xb);
      std::memcpy(xb, g + i, sizeof(float) * size_t(w));
      std::memcpy(&x, xb, sizeof x);
      if (u) {
        std::memset(ub, 0, sizeof ub);
        std::memcpy(ub, u + i, sizeof(float) * size_t(w));
        std::memcpy(&v, ub, sizeof v);
      }
    }
    const VF8 y = sigmoid_act8(x, gelu) * v;
    if (w == 8) {
      std::memcpy(o + i, &y, sizeof y);
    } else {
      std::memcpy(xb, &y, sizeof y);
      std::memcpy(o + i, xb, sizeof(float) * size_t(w));
    }
  }
}

// The other activations element by element: calls body(f) with the activation as a function object,
// so the switch is outside the element loops and a loop as simple as ReLU's compiles to vector max
// instructions.
template <class Body>
void with_activation(Activation act, Body&& body) {
  if (act == Activation::ReLU) return body([](float x) { return relu(x); });
  return body([](float x) { return gelu_erf(x); });
}

bool sigmoid_form(Activation act) { return act == Activation::SiLU || act == Activation::GELU; }
}  // namespace

void gated_activation(Executor& ex, Activation act, const Tensor& gate, const Tensor& up, const Tensor& out) {
  const int64_t d = gate.cols;
  if (sigmoid_form(act)) {
    ex.pool().for_range(gate.rows, ThreadPool::min_rows_for(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++)
        sigmoid_act_row(gate.row(r), up.row(r), out.row(r), d, act == Activation::GELU);
    });
    return;
  }
  with_activation(act, [&](auto f) {
    ex.pool().for_range(gate.rows, ThreadPool::min_rows_for(d), [&](int64_t r0, int64_t r1) {
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
  if (sigmoid_form(act)) {
    ex.pool().for_range(x.rows, ThreadPool::min_rows_for(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) sigmoid_act_row(x.row(r), nullptr, x.row(r), d, act == Activation::GELU);
    });
    return;
  }
  with_activation(act, [&](auto f) {
    ex.pool().for_range(x.rows, ThreadPool::min_rows_for(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        float* v = x.row(r);
        for (int64_t i = 0; i < d; i++) v[i] = f(v[i]);
      }
    });
  });
}

}  // namespace pe::cpu
