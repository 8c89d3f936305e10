// SiLU / GELU, gated or in place: one thread per element.
#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace pe::cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float apply(Activation act, float x) {
  if (act == Activation::SiLU) return x / (1.f + expf(-x));
  if (act == Activation::ReLU) return x > 0.f ? x : 0.f;
  if (act == Activation::GELUErf) return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
  const float kSqrt2OverPi = 0.7978845608028654f;  // tanh approximation, as the CPU backend and ggml
  return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * x * (1.f + 0.044715f * x * x)));
}

// out = act(gate) * up (up null: out = act(gate)).
__global__ void activation_kernel(Activation act, const float* gate, int64_t ldg, const float* up, int64_t ldu,
                                  float* out, int64_t ldo, int d) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= d) return;
  const int64_t r = blockIdx.y;
  const float g = apply(act, gate[r * ldg + i]);
  out[r * ldo + i] = up ? g * up[r * ldu + i] : g;
}

void launch(Executor& ex, Activation act, const Tensor& gate, const float* up, int64_t ldu, const Tensor& out) {
  for (int64_t r0 = 0; r0 < gate.rows; r0 += 65535) {
    const int64_t n = gate.rows - r0 < 65535 ? gate.rows - r0 : 65535;
    const dim3 grid(unsigned(ceil_div(gate.cols, kThreads)), unsigned(n));
    activation_kernel<<<grid, kThreads, 0, stream_of(ex)>>>(act, gate.row(r0), gate.ld(), up ? up + r0 * ldu : nullptr,
                                                             ldu, out.row(r0), out.ld(), int(gate.cols));
    PE_CUDA_LAUNCHED();
  }
}

}  // namespace

void gated_activation(Executor& ex, Activation act, const Tensor& gate, const Tensor& up, const Tensor& out) {
  if (gate.rows) launch(ex, act, gate, up.row(0), up.ld(), out);
}

void activation(Executor& ex, Activation act, const Tensor& x) {
  if (x.rows) launch(ex, act, x, nullptr, 0, x);
}

}  // namespace pe::cuda
