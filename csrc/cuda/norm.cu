// RMSNorm / LayerNorm, optionally after the residual add (add_norm): one block per row, the row's sums
// reduced across the block in fp32 (the CPU backend sums in double; for rows of a few thousand the two
// agree to float rounding).
// 1024 threads and unrolled loops: at decode there is one row, so the kernel's time is the latency
// of its loads; with 256 threads and one load in flight per thread a 4096-wide row took ~8 us on an
// H200 (16 dependent global loads per thread), a tenth of a 7B decode step over its 65 calls.
#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "cuda/reduce.cuh"

namespace pe::cuda {

namespace {

constexpr int kThreads = 1024;

__global__ void norm_kernel(bool rms, float* x, int64_t ldx, const float* res, int64_t ldr, const float* w,
                            const float* b, float* y, int64_t ldy, int d, float eps) {
  float* xr = x + int64_t(blockIdx.x) * ldx;
  float* yr = y + int64_t(blockIdx.x) * ldy;
  __shared__ float scratch[kThreads / 32];
  // The residual add first (add_norm): each thread adds and later normalises the same elements, so
  // reading res here and writing y (which may be res) below needs no barrier between them.
  if (res) {
    const float* rr = res + int64_t(blockIdx.x) * ldr;
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += kThreads) xr[i] += rr[i];
  }
  float mean = 0.f;
  if (!rms) {
    float s = 0.f;
#pragma unroll 4
    for (int i = threadIdx.x; i < d; i += kThreads) s += xr[i];
    mean = block_sum<kThreads>(s, scratch) / float(d);
  }
  float ss = 0.f;
#pragma unroll 4
  for (int i = threadIdx.x; i < d; i += kThreads) {
    const float v = xr[i] - mean;
    ss += v * v;
  }
  const float scale = rsqrtf(block_sum<kThreads>(ss, scratch) / float(d) + eps);
#pragma unroll 4
  for (int i = threadIdx.x; i < d; i += kThreads) yr[i] = (xr[i] - mean) * scale * w[i] + (b ? b[i] : 0.f);
}

// One warp per (row, head): Qwen3's per-head RMSNorm of q and k.
__global__ void norm_heads_kernel(float* x, int64_t ldx, int head_dim, const float* w, float eps) {
  float* v = x + int64_t(blockIdx.x) * ldx + int64_t(blockIdx.y) * head_dim;
  float ss = 0.f;
  for (int i = threadIdx.x; i < head_dim; i += 32) ss += v[i] * v[i];
  const float scale = rsqrtf(warp_sum(ss) / float(head_dim) + eps);
  for (int i = threadIdx.x; i < head_dim; i += 32) v[i] = v[i] * scale * w[i];
}

}  // namespace

void norm_heads(Executor& ex, const Tensor& x, int n_heads, const Tensor& w, float eps) {
  PE_CHECK(n_heads <= 65535 && x.rows <= 0x7fffffff, Error, "norm_heads: ", x.rows, " rows of ", n_heads, " heads");
  const dim3 grid(unsigned(x.rows), unsigned(n_heads));
  norm_heads_kernel<<<grid, 32, 0, stream_of(ex)>>>(x.row(0), x.ld(), int(x.cols / n_heads), w.row(0), eps);
  PE_CUDA_LAUNCHED();
}

void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& residual, const Tensor& w, const Tensor& b,
          const Tensor& y, float eps) {
  if (x.rows == 0) return;
  PE_CHECK(x.rows <= 0x7fffffff, Error, "norm: ", x.rows, " rows are too many for one grid");
  norm_kernel<<<unsigned(x.rows), kThreads, 0, stream_of(ex)>>>(
      type == NormType::RMS, x.row(0), x.ld(), residual.empty() ? nullptr : residual.row(0),
      residual.empty() ? 0 : residual.ld(), w.row(0), b.empty() ? nullptr : b.row(0), y.row(0), y.ld(), int(x.cols),
      eps);
  PE_CUDA_LAUNCHED();
}

}  // namespace pe::cuda
