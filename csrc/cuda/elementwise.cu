// Residual adds, biases and scaling: one thread per element of a row, a grid row per tensor row.
#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace pe::cuda {

namespace {

constexpr int kThreads = 256;

// y[r][i] = a * x[r][i] + c * y[r][i] + (bias ? bias[i] : 0)
__global__ void axpby_kernel(const float* x, int64_t ldx, float a, float* y, int64_t ldy, float c, const float* bias,
                             int d) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= d) return;
  const int64_t r = blockIdx.y;
  const float xv = x ? x[r * ldx + i] : 0.f;
  float& yv = y[r * ldy + i];
  yv = a * xv + (c != 0.f ? c * yv : 0.f) + (bias ? bias[i] : 0.f);
}

void axpby(Executor& ex, const float* x, int64_t ldx, float a, float* y, int64_t ldy, float c, const float* bias,
           int64_t rows, int64_t d) {
  for (int64_t r0 = 0; r0 < rows; r0 += 65535) {
    const int64_t n = rows - r0 < 65535 ? rows - r0 : 65535;
    const dim3 grid(unsigned(ceil_div(d, kThreads)), unsigned(n));
    axpby_kernel<<<grid, kThreads, 0, stream_of(ex)>>>(x ? x + r0 * ldx : nullptr, ldx, a, y + r0 * ldy, ldy, c, bias,
                                                        int(d));
    PE_CUDA_LAUNCHED();
  }
}

__global__ void softcap_kernel(float* x, int64_t ldx, float cap, int d) {
  const int i = blockIdx.x * kThreads + threadIdx.x;
  if (i >= d) return;
  float& v = x[int64_t(blockIdx.y) * ldx + i];
  v = cap * tanhf(v / cap);
}

}  // namespace

void softcap(Executor& ex, const Tensor& x, float cap) {
  for (int64_t r0 = 0; r0 < x.rows; r0 += 65535) {
    const int64_t n = x.rows - r0 < 65535 ? x.rows - r0 : 65535;
    const dim3 grid(unsigned(ceil_div(x.cols, kThreads)), unsigned(n));
    softcap_kernel<<<grid, kThreads, 0, stream_of(ex)>>>(x.row(r0), x.ld(), cap, int(x.cols));
    PE_CUDA_LAUNCHED();
  }
}

void add(Executor& ex, const Tensor& x, const Tensor& y) {
  if (x.rows) axpby(ex, y.row(0), y.ld(), 1.f, x.row(0), x.ld(), 1.f, nullptr, x.rows, x.cols);
}

void add_bias(Executor& ex, const Tensor& y, const Tensor& b) {
  if (y.rows) axpby(ex, nullptr, 0, 0.f, y.row(0), y.ld(), 1.f, b.row(0), y.rows, y.cols);
}

void scale(Executor& ex, const Tensor& x, float alpha, const Tensor& y) {
  if (x.rows) axpby(ex, x.row(0), x.ld(), alpha, y.row(0), y.ld(), 0.f, nullptr, x.rows, x.cols);
}

}  // namespace pe::cuda
