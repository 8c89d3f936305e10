// Rotary position embedding in place: one thread per (token, head, rotated pair). The inverse
// frequencies are computed on the host exactly as the CPU backend does (powf of the base, divided by
// the freq_factors of Llama-3 or LongRoPE) and passed by value, so the two backends rotate by the same
// angles; cos and sin are scaled by the attention factor, as the CPU's.
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/ops.h"

namespace pe::cuda {

namespace {

constexpr int kMaxPairs = 256;  // head_dim up to 512
constexpr int kThreads = 128;

struct InvFreq {
  float v[kMaxPairs];
};

__global__ void rope_kernel(float* x, int64_t ldx, int n_heads, int head_dim, int first_dim, const int32_t* pos,
                            int half, bool neox, float freq_scale, float attn_factor, InvFreq inv_freq) {
  const int i = blockIdx.x * kThreads + threadIdx.x;  // pair index within all heads of the token
  if (i >= n_heads * half) return;
  const int64_t t = blockIdx.y;
  const int h = i / half, j = i % half;
  float* v = x + t * ldx + int64_t(h) * head_dim + first_dim;
  float s, c;
  sincosf(float(pos[t]) * freq_scale * inv_freq.v[j], &s, &c);
  s *= attn_factor;
  c *= attn_factor;
  const int ia = neox ? j : 2 * j, ib = neox ? j + half : 2 * j + 1;
  const float a = v[ia], b = v[ib];
  v[ia] = a * c - b * s;
  v[ib] = a * s + b * c;
}

}  // namespace

void rope(Executor& ex, const Tensor& x, int n_heads, int head_dim, int first_dim, const Tensor& pos,
          const RopeParams& p) {
  const int half = p.n_dims / 2;
  PE_CHECK(half <= kMaxPairs, Error, "rope: ", p.n_dims, " rotated dims, the CUDA backend handles up to ",
           2 * kMaxPairs);
  if (x.rows == 0 || half == 0) return;
  InvFreq f{};
  for (int i = 0; i < half; i++) {
    f.v[i] = std::pow(p.freq_base, -2.0f * float(i) / float(p.n_dims));
    if (p.freq_factors) f.v[i] /= p.freq_factors[i];
  }
  for (int64_t r0 = 0; r0 < x.rows; r0 += 65535) {
    const int64_t n = x.rows - r0 < 65535 ? x.rows - r0 : 65535;
    const dim3 grid(unsigned(ceil_div(int64_t(n_heads) * half, kThreads)), unsigned(n));
    rope_kernel<<<grid, kThreads, 0, stream_of(ex)>>>(x.row(r0), x.ld(), n_heads, head_dim, first_dim,
                                                       static_cast<const int32_t*>(pos.data) + r0, half,
                                                       p.style == RopeStyle::NeoX, p.freq_scale, p.attn_factor, f);
    PE_CUDA_LAUNCHED();
  }
}

}  // namespace pe::cuda
