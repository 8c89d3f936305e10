// Matmul front end: argument checks, activation quantization, work split over the thread pool, and
// dispatch to the kernel family cpu_path() names. The kernels themselves live in matmul_<isa>.cpp.
#include "ops/matmul.h"

#include <algorithm>
#include <atomic>
#include <cstring>

#include "cpu/matmul_kernels.h"
#include "cpu/ops.h"
#include "cpu_features.h"

namespace pe::cpu {

namespace {

std::atomic<bool> g_two_panels{!cpu_is_amd()};
std::atomic<int64_t> g_prefetch_bytes{cpu_is_amd() ? 64 : 1024};
std::atomic<int64_t> g_spread_bytes{cpu_is_amd() ? 1728 : 0};
std::atomic<int64_t> g_rows_prefetch_bytes{cpu_is_amd() ? 2048 : 1024};
std::atomic<int> g_small_passes_32{cpu_is_amd() ? 6 : 0};

}  // namespace

DecodeTuning decode_tuning() {
  return DecodeTuning{g_two_panels.load(std::memory_order_relaxed), g_prefetch_bytes.load(std::memory_order_relaxed),
                      g_spread_bytes.load(std::memory_order_relaxed),
                      g_rows_prefetch_bytes.load(std::memory_order_relaxed),
                      g_small_passes_32.load(std::memory_order_relaxed)};
}

void set_decode_tuning(DecodeTuning t) {
  PE_CHECK(t.prefetch_bytes >= 0 && t.prefetch_bytes <= (int64_t(1) << 20), Error,
           "decode prefetch distance must be in [0, 1 MiB], not ", t.prefetch_bytes);
  PE_CHECK(t.spread_bytes >= 0 && t.spread_bytes <= (int64_t(1) << 20), Error,
           "decode spread prefetch distance must be in [0, 1 MiB], not ", t.spread_bytes);
  PE_CHECK(t.rows_prefetch_bytes >= 0 && t.rows_prefetch_bytes <= (int64_t(1) << 20), Error,
           "decode prefetch distance for several rows must be in [0, 1 MiB], not ", t.rows_prefetch_bytes);
  PE_CHECK(t.small_passes_32 >= 0 && t.small_passes_32 <= 64, Error,
           "decode passes before packing must be in [0, 64], not ", t.small_passes_32);
  g_two_panels.store(t.two_panels);
  g_small_passes_32.store(t.small_passes_32);
  g_rows_prefetch_bytes.store(t.rows_prefetch_bytes);
  g_prefetch_bytes.store(t.prefetch_bytes);
  g_spread_bytes.store(t.spread_bytes);
}

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
// the threads claim one at a time, so that a thread the OS deschedules (another process on the core)
// holds up only the chunk it has, and the others take the rest. The chunks shrink as OpenMP's guided
// schedule's do: each is what is left over the thread count. The first ones are long streams (every
// chunk restarts the prefetchers: SmolLM2 Q4_0, 2 threads, Zen 4, one sequence 3.7 -> 3.4 ms a step
// against four equal chunks per thread, 8 sequences 2-10 % less) and the last ones a grain, so the
// threads finish together. Activation rows are split instead, evenly, only when W has too few rows to
// go round.
template <class Kernel>
void run_split(ThreadPool& pool, int64_t rows, int64_t m, const Kernel& kernel) {
  const int nth = pool.size();
  const int64_t grains = (rows + kRowGrain - 1) / kRowGrain;
  if (nth == 1 || grains >= 4 * nth || m < 2 * nth) {
    constexpr int kMaxChunks = 256;  // the last one takes what is left (only past ~40 threads)
    int64_t end[kMaxChunks];         // grain where chunk c ends
    int chunks = 0;
    for (int64_t g = 0; g < grains; chunks++)
      end[chunks] = g = chunks == kMaxChunks - 1 ? grains : g + std::max<int64_t>(1, (grains - g) / nth);
    pool.for_each_dynamic(chunks, [&](int64_t c) {
      const int64_t r0 = (c == 0 ? 0 : end[c - 1]) * kRowGrain, r1 = std::min(rows, end[c] * kRowGrain);
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

// MatmulRounding::Bf16 from this many rows (fewer go to the int8 kernels for few rows, which stream each
// weight once). T5-base Q8_0 encoder, Xeon model 167, one thread, medians of 4-5, tok/s int8 tiles /
// bfloat16: 16 rows 900 / 930, 24 rows 1240 / 1265, 32 rows 1405 / 1470, 64 rows 1650 / 1965, 256 rows
// 1400 / 2150.
constexpr int64_t kBf16MinRows = 16;

// The AVX-512 float tiles (from 16 rows of x, kFloatPanelMinM) broadcast x from 12 rows ldx apart at
// once; with ldx a multiple of 4 KiB (rows of 1024, 2048, 4096 floats) all those lines fall in one L1 set
// and evict each other. So such an x is copied to rows 64 bytes longer first, in the calling thread's
// buffer (the same values: the results do not change). 2048-wide F16 prefill, one Zen 4 core: 82 -> 110
// GFLOP/s; the AVX2 tiles ran 79 either way.
void pad_x_rows(ThreadPool& pool, int64_t m, int64_t cols, const float*& x, int64_t& ldx) {
  if (m < 16 || (ldx * int64_t(sizeof(float))) % 4096 != 0) return;
  thread_local ScratchBuffer x_pad;
  const int64_t ld = ldx + 16;
  auto* xp = static_cast<float*>(x_pad.get(size_t(m * ld) * sizeof(float)));
  pool.for_range(m, ThreadPool::min_rows_for(cols), [&](int64_t m0, int64_t m1) {
    for (int64_t c = m0; c < m1; c++) std::memcpy(xp + c * ld, x + c * ldx, size_t(cols) * sizeof(float));
  });
  x = xp;
  ldx = ld;
}

// ys[i] = x ws[i]^T on bfloat16 tiles: x rounded once into the calling thread's buffer, then the
// weights' rows 32 at a time, claimed by the threads one by one.
void matmul_bf16(ThreadPool& pool, const MatmulKernels& k, const Tensor* ws, const Tensor* ys, int n, const float* x,
                 int64_t ldx, int64_t m, int64_t cols) {
  constexpr int64_t kRows = 32;
  const int64_t padded = (m + 15) / 16 * 16;
  thread_local ScratchBuffer tiles;
  auto* xt = static_cast<uint16_t*>(tiles.get(size_t(padded * cols) * sizeof(uint16_t)));
  pool.for_range(padded, 16, [&](int64_t r0, int64_t r1) { k.pack_x_bf16(x, ldx, r0, r1, m, cols, xt); });
  std::vector<int64_t> first(size_t(n) + 1, 0);  // weight i's items start at first[i]
  for (int i = 0; i < n; i++) first[size_t(i) + 1] = first[size_t(i)] + (ws[i].rows + kRows - 1) / kRows;
  pool.for_each_dynamic(first[size_t(n)], [&](int64_t item) {
    int i = 0;
    while (item >= first[size_t(i) + 1]) i++;
    const int64_t r0 = (item - first[size_t(i)]) * kRows;
    k.gemm_bf16(ws[i], xt, m, r0, std::min(ws[i].rows, r0 + kRows), ys[i].row(0), ys[i].ld());
  });
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

void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y, MatmulRounding rounding) {
  matmul_group(ex, &w, &y, 1, x, rounding);
}

void matmul_group(Executor& ex, const Tensor* ws, const Tensor* ys, int n, const Tensor& xt, MatmulRounding rounding) {
  const float* x = xt.row(0);
  const int64_t m = xt.rows;
  int64_t ldx = xt.ld();
  ThreadPool& pool = ex.pool();
  const MatmulKernels& k = kernels();
  const Tensor& w0 = ws[0];

  // The weights' rows end to end, each weight's first row on a kRowGrain boundary, so that every chunk
  // run_split hands out starts on a panel boundary of each weight it covers.
  constexpr int kMaxGroup = 4;
  PE_CHECK(n >= 1 && n <= kMaxGroup, Error, "matmul: ", n, " weights in one group (at most ", kMaxGroup, ")");
  int64_t first[kMaxGroup + 1] = {0};
  for (int i = 0; i < n; i++) first[i + 1] = first[i] + (ws[i].rows + kRowGrain - 1) / kRowGrain * kRowGrain;
  // Calls f(i, a, b) for the rows [a, b) of weight i that fall in the group's rows [r0, r1).
  auto each = [&](int64_t r0, int64_t r1, auto&& f) {
    for (int i = 0; i < n; i++) {
      const int64_t a = std::max(r0, first[i]) - first[i], b = std::min(r1, first[i] + ws[i].rows) - first[i];
      if (a < b) f(i, a, b);
    }
  };

  if (is_float_type(w0.type)) {
    Tensor rows[kMaxGroup];  // the copies in huge pages, where there are (cpu/panels.h)
    for (int i = 0; i < n; i++) {
      rows[i] = ws[i];
      if (ws[i].panels && ws[i].panel_rows == 1) rows[i].data = const_cast<void*>(ws[i].panels);
    }
    pad_x_rows(pool, m, w0.cols, x, ldx);
    run_split(pool, first[n], m, [&](int64_t r0, int64_t r1, int64_t m0, int64_t m1) {
      each(r0, r1, [&](int i, int64_t a, int64_t b) { k.gemm_float(rows[i], x, ldx, a, b, m0, m1, ys[i].row(0), ys[i].ld()); });
    });
    return;
  }

  if (rounding == MatmulRounding::Bf16 && k.gemm_bf16 && m >= kBf16MinRows) {
    bool all = true;
    for (int i = 0; i < n; i++) all = all && k.bf16_supports(ws[i].type);
    if (all) return matmul_bf16(pool, k, ws, ys, n, x, ldx, m, w0.cols);
  }

  // Quantized activations live in the calling thread's buffers; the pool's threads only read them.
  const QuantScheme& s = *quant_scheme(w0.type);
  thread_local ScratchBuffer q_buf, sub_buf;
  QuantizedX qx;
  qx.ldq = (w0.cols + 63) & ~int64_t(63);
  qx.ldsub = w0.cols / s.sub;
  qx.q = static_cast<int8_t*>(q_buf.get(size_t(m * qx.ldq)));
  qx.sub = static_cast<XSub*>(sub_buf.get(size_t(m * qx.ldsub) * sizeof(XSub)));

  pool.for_range(m, ThreadPool::min_rows_for(w0.cols), [&](int64_t m0, int64_t m1) { k.quantize_x(x, ldx, m0, m1, w0.cols, s, qx); });
  run_split(pool, first[n], m, [&](int64_t r0, int64_t r1, int64_t m0, int64_t m1) {
    each(r0, r1, [&](int i, int64_t a, int64_t b) { k.gemm_quant(ws[i], qx, a, b, m0, m1, ys[i].row(0), ys[i].ld()); });
  });
}

}  // namespace pe::cpu
