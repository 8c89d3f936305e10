// Matmul front end: argument checks, activation quantization, work split over the thread pool, and
// dispatch to the kernel family cpu_path() names. The kernels themselves live in matmul_<isa>.cpp.
#include "ops/matmul.h"

#include <algorithm>

#include "cpu/matmul_kernels.h"
#include "cpu/ops.h"
#include "cpu_features.h"

namespace pe::cpu {


namespace {

const MatmulKernels& kernels() {
#if defined(PE_X86)
  switch (cpu_path()) {
    case CpuPath::AMX: return kAmxKernels;
    case CpuPath::AVX512: return kAvx512Kernels;
    case CpuPath::AVX2: return kAvx2Kernels;
    default: break;
  }
#endif
  return kPortableKernels;
}

// Rows are handed out in multiples of 16 (the AVX-512 panel height; twice the AVX2 one).
constexpr int64_t kRowGrain = 16;

// Runs kernel(r0, r1, m0, m1) over the m x rows output on the pool. Splitting W's rows keeps each
// weight byte read by one thread (decode streams W once): the rows go in chunks of whole grains that
// the threads claim one at a time, about four per thread, so that a thread the OS deschedules (another
// process on the core) holds up only the chunk it has, and the others take the rest. Activation rows
// are split instead, evenly, only when W has too few rows to go round.
template <class Kernel>
void run_split(ThreadPool& pool, int64_t rows, int64_t m, const Kernel& kernel) {
  const int nth = pool.size();
  const int64_t grains = (rows + kRowGrain - 1) / kRowGrain;
  if (nth == 1 || grains >= 4 * nth || m < 2 * nth) {
    const int64_t per_chunk = std::max<int64_t>(1, grains / (4 * int64_t(nth)));
    const int64_t chunks = (grains + per_chunk - 1) / per_chunk;
    pool.for_each_dynamic(chunks, [&](int64_t c) {
      const int64_t r0 = c * per_chunk * kRowGrain, r1 = std::min(rows, (c + 1) * per_chunk * kRowGrain);
      kernel(r0, r1, int64_t(0), m);
    });
  } else {
    // One part per thread, as ThreadPool::split cuts them: a row's float-weight result depends on how
    // many rows share its kernel call (AVX-512 panels), so the parts must not depend on timing.
    pool.for_each_dynamic(nth, [&](int64_t part) {
      int64_t m0, m1;
      ThreadPool::split(m, int(part), nth, m0, m1);
      if (m0 < m1) kernel(int64_t(0), rows, m0, m1);
    });
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
    Tensor rows = w;  // the copy in huge pages, where there is one (cpu/panels.h)
    if (w.panels && w.panel_rows == 1) rows.data = const_cast<void*>(w.panels);
    run_split(pool, w.rows, m, [&](int64_t r0, int64_t r1, int64_t m0, int64_t m1) {
      k.gemm_float(rows, x, ldx, r0, r1, m0, m1, y, ldy);
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

  pool.for_range(m, 2 * nth, [&](int64_t m0, int64_t m1) { k.quantize_x(x, ldx, m0, m1, w.cols, s, qx); });
  run_split(pool, w.rows, m, [&](int64_t r0, int64_t r1, int64_t m0, int64_t m1) {
    k.gemm_quant(w, qx, r0, r1, m0, m1, y, ldy);
  });
}

}  // namespace pe::cpu
