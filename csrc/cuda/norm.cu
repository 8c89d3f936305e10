// RMSNorm / LayerNorm: one block per row, the row's sums reduced across the block in fp32 (the CPU
// backend sums in double; for rows of a few thousand the two agree to float rounding).
#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "cuda/reduce.cuh"

namespace pe::cuda {

namespace {

constexpr int kThreads = 256;

__global__ void norm_kernel(bool rms, const float* x, int64_t ldx, const float* w, const float* b, float* y,
                            int64_t ldy, int d, float eps) {
  const float* xr = x + int64_t(blockIdx.x) * ldx;
  float* yr = y + int64_t(blockIdx.x) * ldy;
  __shared__ float scratch[kThreads / 32];
  float mean = 0.f;
  if (!rms) {
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += kThreads) s += xr[i];
    mean = block_sum<kThreads>(s, scratch) / float(d);
  }
  float ss = 0.f;
  for (int i = threadIdx.x; i < d; i += kThreads) {
    const float v = xr[i] - mean;
    ss += v * v;
  }
  const float scale = rsqrtf(block_sum<kThreads>(ss, scratch) / float(d) + eps);
  for (int i = threadIdx.x; i < d; i += kThreads) yr[i] = (xr[i] - mean) * scale * w[i] + (b ? b[i] : 0.f);
}

}  // namespace

void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y, float eps) {
  if (x.rows == 0) return;
  norm_kernel<<<unsigned(x.rows), kThreads, 0, stream_of(ex)>>>(type == NormType::RMS, x.row(0), x.ld(), w.row(0),
                                                                  b.empty() ? nullptr : b.row(0), y.row(0), y.ld(),
                                                                  int(x.cols), eps);
  PE_CUDA_LAUNCHED();
}

}  // namespace pe::cuda
