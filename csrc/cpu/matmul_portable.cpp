// Portable matmul kernels: plain C++, any CPU. They define the arithmetic the SIMD paths reproduce
// (same integer dot products, same per-sub-block scaling), so all paths agree to float rounding.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "cpu/finite.h"
#include "cpu/matmul_kernels.h"

namespace pe::cpu {

ScratchBuffer::~ScratchBuffer() { std::free(data_); }

void* ScratchBuffer::get(size_t bytes) {
  if (bytes > size_) {
    std::free(data_);
    size_ = (bytes + 4095) & ~size_t(4095);
    data_ = std::aligned_alloc(64, size_);
    if (!data_) throw std::bad_alloc();
  }
  return data_;
}

void quantize_x_row_ref(const float* x, int64_t k, const QuantScheme& s, int8_t* q, XSub* sub) {
  const int per_block = 32 / s.sub;  // sub-blocks per 32-element activation block
  for (int64_t b = 0; b < k / 32; b++) {
    const float* xb = x + 32 * b;
    int8_t* qb = q + 32 * b;
    if (!all_finite(xb, 32)) {
      std::memset(qb, 0, 32);
      for (int j = 0; j < per_block; j++) sub[b * per_block + j] = non_finite_xsub();
      continue;
    }
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = std::max(amax, std::fabs(xb[i]));
    if (amax < kMinQuantAmax) amax = 0.0f;
    const float d = amax / 127.0f;
    const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    for (int i = 0; i < 32; i++) qb[i] = int8_t(std::nearbyint(xb[i] * id));
    for (int j = 0; j < per_block; j++) {
      int sum = 0;
      for (int i = 0; i < s.sub; i++) sum += qb[j * s.sub + i];
      XSub& e = sub[b * per_block + j];
      e.bias = -s.offset * sum;
      e.d = d;
      e.s = d * float(sum);
      e.pad = 0.0f;
    }
  }
}

namespace {

void quantize_x(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k, const QuantScheme& s,
                const QuantizedX& out) {
  for (int64_t r = m0; r < m1; r++) quantize_x_row_ref(x + r * ldx, k, s, out.q + r * out.ldq, out.sub + r * out.ldsub);
}

void gemm_quant(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  const QuantScheme& s = *quant_scheme(w.type);
  const int64_t k = w.cols, nblk = k / s.block, nsub = k / s.sub;
  thread_local ScratchBuffer buf;
  auto* u = static_cast<uint8_t*>(buf.get(size_t(k) + 2 * sizeof(float) * size_t(nsub) + 64));
  float* scale = reinterpret_cast<float*>(u + ((k + 63) & ~int64_t(63)));
  float* min = scale + nsub;
  const int subs_per_block = s.block / s.sub;
  for (int64_t r = r0; r < r1; r++) {
    const auto* row = static_cast<const uint8_t*>(w.data) + r * w.row_stride;
    for (int64_t b = 0; b < nblk; b++)
      unpack_block(s, row + b * s.block_bytes, u + b * s.block, scale + b * subs_per_block, min + b * subs_per_block);
    for (int64_t c = m0; c < m1; c++) {
      const int8_t* q = x.q + c * x.ldq;
      const XSub* xs = x.sub + c * x.ldsub;
      float acc = 0.0f;
      for (int64_t j = 0; j < nsub; j++) {
        int32_t dot = xs[j].bias;
        for (int i = 0; i < s.sub; i++) dot += int32_t(u[j * s.sub + i]) * q[j * s.sub + i];
        acc += float(dot) * xs[j].d * scale[j];
        if (s.has_min) acc += min[j] * xs[j].s;
      }
      y[c * ldy + r] = acc;
    }
  }
}

void gemm_float(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                float* y, int64_t ldy) {
  const int64_t k = w.cols;
  thread_local ScratchBuffer buf;
  auto* wf = static_cast<float*>(buf.get(size_t(k) * sizeof(float)));
  for (int64_t r = r0; r < r1; r++) {
    dequantize_row_ref(w.type, static_cast<const uint8_t*>(w.data) + r * w.row_stride, k, wf);
    for (int64_t c = m0; c < m1; c++) {
      const float* xc = x + c * ldx;
      // Four partial sums: shorter dependency chains, and closer to the SIMD paths' rounding. Element i
      // always goes to sum i % 4, tail included, so that zero-weighted elements appended to k (attention's
      // masked keys) leave the result unchanged.
      float a[4] = {0, 0, 0, 0};
      int64_t i = 0;
      for (; i + 4 <= k; i += 4) {
        a[0] += wf[i] * xc[i];
        a[1] += wf[i + 1] * xc[i + 1];
        a[2] += wf[i + 2] * xc[i + 2];
        a[3] += wf[i + 3] * xc[i + 3];
      }
      for (int l = 0; i < k; i++, l++) a[l] += wf[i] * xc[i];
      y[c * ldy + r] = (a[0] + a[1]) + (a[2] + a[3]);
    }
  }
}

}  // namespace

const MatmulKernels kPortableKernels = {quantize_x, gemm_quant, gemm_float};

}  // namespace pe::cpu
