// Matmul front end: argument checks, activation quantization, work split over the thread pool, and
// dispatch to the kernel family cpu_path() names. The kernels themselves live in matmul_<isa>.cpp.
#include "ops/matmul.h"

#include <algorithm>

#include "cpu/matmul_kernels.h"
#include "cpu/ops.h"
#include "cpu_features.h"

namespace pe::cpu {


namespace {

bool is_float_type(GGMLType t) { return t == GGMLType::F32 || t == GGMLType::F16 || t == GGMLType::BF16; }

const MatmulKernels& kernels() {
#if defined(PE_X86)
  switch (cpu_path()) {
    case CpuPath::AVX512: return kAvx512Kernels;
    case CpuPath::AVX2: return kAvx2Kernels;
    default: break;
  }
#endif
  return kPortableKernels;
}

// Rows are handed out in multiples of 16 (the AVX-512 panel height; twice the AVX2 one).
constexpr int64_t kRowGrain = 16;

// Thread ith's share of the m x rows output. Splitting W's rows keeps each weight byte read by one
// thread (decode streams W once); activation rows are split only when W has too few rows to go round.
void split_work(int64_t rows, int64_t m, int ith, int nth, int64_t& r0, int64_t& r1, int64_t& m0, int64_t& m1) {
  const int64_t grains = (rows + kRowGrain - 1) / kRowGrain;
  if (nth == 1 || grains >= 4 * nth || m < 2 * nth) {
    ThreadPool::split(grains, ith, nth, r0, r1);
    r0 = std::min(rows, r0 * kRowGrain);
    r1 = std::min(rows, r1 * kRowGrain);
    m0 = 0;
    m1 = m;
  } else {
    ThreadPool::split(m, ith, nth, m0, m1);
    r0 = 0;
    r1 = rows;
  }
}

}  // namespace

bool matmul_supports(GGMLType t) { return is_float_type(t) || quant_scheme(t) != nullptr; }

void dequantize_row(const Tensor& w, int64_t r, float* out) {
  PE_CHECK(cpu::matmul_supports(w.type), UnsupportedModelError, "dequantize: unsupported type ",
           type_name(uint32_t(w.type)));
  PE_CHECK(r >= 0 && r < w.rows, Error, "dequantize: row ", r, " out of range [0, ", w.rows, ")");
  row_bytes(w.type, w.cols);
  dequantize_row_ref(w.type, static_cast<const uint8_t*>(w.data) + r * w.row_stride, w.cols, out);
}

void matmul(Executor& ex, const Tensor& w, const Tensor& xt, const Tensor& yt) {
  const float* x = xt.row(0);
  float* y = yt.row(0);
  const int64_t m = xt.rows, ldx = xt.ld(), ldy = yt.ld();
  ThreadPool& pool = ex.pool();
  const MatmulKernels& k = kernels();
  const int nth = pool.size();

  if (is_float_type(w.type)) {
    pool.run([&](int ith, int n) {
      int64_t r0, r1, m0, m1;
      split_work(w.rows, m, ith, n, r0, r1, m0, m1);
      if (r0 < r1 && m0 < m1) k.gemm_float(w, x, ldx, r0, r1, m0, m1, y, ldy);
    });
    return;
  }

  // Quantized activations live in the calling thread's buffers; the pool's threads only read them.
  const QuantScheme& s = *quant_scheme(w.type);
  thread_local ScratchBuffer q_buf, sub_buf;
  QuantizedX qx;
  qx.ldq = (w.cols + 63) & ~int64_t(63);
  qx.ldsub = w.cols / s.sub;
  qx.q = static_cast<int8_t*>(q_buf.get(size_t(m * qx.ldq)));
  qx.sub = static_cast<XSub*>(sub_buf.get(size_t(m * qx.ldsub) * sizeof(XSub)));

  if (m >= 2 * nth && nth > 1) {
    pool.run([&](int ith, int n) {
      int64_t m0, m1;
      ThreadPool::split(m, ith, n, m0, m1);
      if (m0 < m1) k.quantize_x(x, ldx, m0, m1, w.cols, s, qx);
    });
  } else {
    k.quantize_x(x, ldx, 0, m, w.cols, s, qx);
  }
  pool.run([&](int ith, int n) {
    int64_t r0, r1, m0, m1;
    split_work(w.rows, m, ith, n, r0, r1, m0, m1);
    if (r0 < r1 && m0 < m1) k.gemm_quant(w, qx, r0, r1, m0, m1, y, ldy);
  });
}

}  // namespace pe::cpu
