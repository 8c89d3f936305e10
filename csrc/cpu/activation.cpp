#include <cmath>
#include <cstring>

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
// SiLU gating, o = silu(g) * u, 16 elements at a time: silu(x) = x * sigmoid(x) with e = e^-|x| by
// Cephes' degree-6 polynomial (as attention's softmax; ~2 ulp), sigmoid = 1 / (1 + e) for x >= 0 and
// e / (1 + e) below. libm's scalar expf per element was ~5 % of a batched decode step. Written with GCC
// vector types, compiled for x86-64-v4 and v3 as well as the baseline (picked at load), as the quantizer
// searches are; a row's tail goes through the same code in a padded block, so every element gets the
// same arithmetic. NaN stays NaN.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PE_VEC_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PE_VEC_CLONES
#endif
typedef float VF __attribute__((vector_size(64)));
typedef int32_t VI __attribute__((vector_size(64)));

__attribute__((always_inline)) inline VF silu_gate16(VF x, VF u) {
  const VF ax = (VF)((VI)x & 0x7fffffff);
  VF t = -ax;
  t = (VF)(((VI)(t < -87.3f) & (VI)(VF{} - 87.3f)) | (~(VI)(t < -87.3f) & (VI)t));  // e^-87.3 ~ 1e-38 at most
  const VF n = (t * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  VF r = t - n * 0.693359375f;  // ln 2 in two parts, so that r is exact
  r = r + n * 2.12194440e-4f;
  VF p = VF{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + (r + 1.f);
  const VF e = p * (VF)((__builtin_convertvector(n, VI) + 127) << 23);
  const VI pos = (VI)(x >= 0.f);
  const VF num = (VF)((pos & (VI)(VF{} + 1.f)) | (~pos & (VI)e));
  return x * (num / (1.f + e)) * u;
}

PE_VEC_CLONES void silu_gate_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    VF x, v;
    std::memcpy(&x, g + i, sizeof x);
    std::memcpy(&v, u + i, sizeof v);
    const VF y = silu_gate16(x, v);
    std::memcpy(o + i, &y, sizeof y);
  }
  if (i < n) {
    float xb[16] = {}, ub[16] = {};
    std::memcpy(xb, g + i, sizeof(float) * size_t(n - i));
    std::memcpy(ub, u + i, sizeof(float) * size_t(n - i));
    VF x, v;
    std::memcpy(&x, xb, sizeof x);
    std::memcpy(&v, ub, sizeof v);
    const VF y = silu_gate16(x, v);
    std::memcpy(xb, &y, sizeof y);
    std::memcpy(o + i, xb, sizeof(float) * size_t(n - i));
  }
}

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
  if (act == Activation::SiLU) {
    ex.pool().for_range(gate.rows, 2, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) silu_gate_row(gate.row(r), up.row(r), out.row(r), d);
    });
    return;
  }
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
