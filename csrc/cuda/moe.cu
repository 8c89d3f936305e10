// The CUDA part of the mixture-of-experts op (ops/moe.h): adding up each row's experts, one thread
// per element of an output row, a grid row per output row. A slot outside y (never from moe_ffn) adds
// nothing.
#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace pe::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void moe_combine_kernel(const float* y, int64_t ldy, int64_t y_rows, const int32_t* slot,
                                   const float* weight, int k, float* out, int64_t ldo, int d) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= d) return;
  const int64_t r = blockIdx.y;
  float acc = 0.f;
  for (int j = 0; j < k; j++) {
    const int32_t s = slot[r * k + j];
    if (s >= 0 && s < y_rows) acc += weight[r * k + j] * y[int64_t(s) * ldy + i];
  }
  out[r * ldo + i] = acc;
}

}  // namespace

void moe_combine(Executor& ex, const Tensor& y, const Tensor& slot, const Tensor& weight, int64_t k,
                 const Tensor& out) {
  PE_CHECK(k <= 1024, Error, "moe_combine: ", k, " experts per row are too many");
  for (int64_t r0 = 0; r0 < out.rows; r0 += 65535) {
    const int64_t n = out.rows - r0 < 65535 ? out.rows - r0 : 65535;
    const dim3 grid(unsigned(ceil_div(out.cols, kThreads)), unsigned(n));
    moe_combine_kernel<<<grid, kThreads, 0, stream_of(ex)>>>(
        static_cast<const float*>(y.data), y.ld(), y.rows, static_cast<const int32_t*>(slot.data) + r0 * k,
        weight.row(0) + r0 * k, int(k), out.row(r0), out.ld(), int(out.cols));
    PE_CUDA_LAUNCHED();
  }
}

}  // namespace pe::cuda
