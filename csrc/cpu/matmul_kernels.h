// Internal interface between the matmul front end (matmul.cpp: checks, activation buffers, threading)
// and the per-ISA kernels (matmul_portable.cpp, matmul_avx2.cpp, matmul_avx512.cpp).
#pragma once
#include <cstdint>
#include <cstdlib>

#include "cpu/quant_blocks.h"
#include "ops/matmul.h"

#define PE_INLINE inline __attribute__((always_inline))

namespace pe::cpu {

// Per activation row and weight sub-block, what the integer kernels need besides the int8 values.
struct XSub {
  int32_t bias;  // -offset * sum(q) over the sub-block: folds the weights' offset into the dot product
  float d;       // scale of the 32-element activation block that holds the sub-block
  float s;       // d * sum(q) over the sub-block: multiplies the weights' min
  float pad;
};

// Activations quantized for one matmul, as ggml's Q8_0 but with a float scale: each 32 elements get
// d = max|x| / 127 and q = round-half-even(x * 127 / max|x|), so |q| <= 127 (pmaddubsw's sign trick
// and the u8 x s8 products rely on q != -128). A block holding a NaN or Inf is stored as q = 0 with
// d = s = NaN (kNonFiniteBlock), never converted to integers: every path then gives NaN for the
// rows it touches, and the forward pass reports the layer (model/forward.cpp). Row r's values start at q + r * ldq (ldq a multiple of
// 64), its sub-block entries at sub + r * ldsub.
struct QuantizedX {
  int8_t* q = nullptr;
  int64_t ldq = 0;
  XSub* sub = nullptr;
  int64_t ldsub = 0;
};

// One kernel family. Rows [r0, r1) of W against activation rows [m0, m1) into Y; each call runs on one
// thread. gemm_quant reads activations quantized by the same family's quantize_x.
struct MatmulKernels {
  void (*quantize_x)(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k, const QuantScheme& s,
                     const QuantizedX& out);
  void (*gemm_quant)(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                     float* y, int64_t ldy);
  void (*gemm_float)(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0,
                     int64_t m1, float* y, int64_t ldy);
  // MatmulRounding::Bf16 on a matrix unit (AMX: matmul_amx_bf16.h), null elsewhere: rows [r0, r1) of x
  // (floats) into bfloat16 tiles (rows from m on are zeros); whether W's type is taken; rows [r0, r1) of
  // W (r0 a multiple of 32) against the m rows of the tiles.
  void (*pack_x_bf16)(const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m, int64_t k, uint16_t* out);
  bool (*bf16_supports)(GGMLType t);
  void (*gemm_bf16)(const WeightView& w, const uint16_t* xt, int64_t m, int64_t r0, int64_t r1, float* y, int64_t ldy);
};

extern const MatmulKernels kPortableKernels;
#if defined(PE_X86)
extern const MatmulKernels kAvx2Kernels;
extern const MatmulKernels kAvx512Kernels;
extern const MatmulKernels kAmxKernels;  // kAvx512Kernels with prefill on AMX tiles (matmul_avx512.cpp)
// Float-weight kernels, in their own files (matmul_float_<isa>.cpp).
void gemm_float_avx2(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                     float* y, int64_t ldy);
void gemm_float_avx512(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0,
                       int64_t m1, float* y, int64_t ldy);
#endif

// How decode (few activation rows, matmul_simd.h) walks the packed panels. The kernels are the same code
// on every CPU; the memory systems differ, so these choices follow the vendor (cpu_is_amd()).
//   two_panels      two panels per loop where the ISA's kernels have that loop for the type: independent
//                   dependency chains for the core, but two interleaved streams for the prefetchers.
//   prefetch_bytes  how far ahead of the kernel each block's bytes are software-prefetched (0: not).
//   spread_bytes    for the types whose block keeps its scales at its end (Q6_K, Q3_K, Q2_K: those of the
//                   tail prefetch, PackBase::kTail), each unit of a block also asks for a unit's bytes this
//                   far ahead, so the next block's lines are asked for across this one (0: not).
//   rows_prefetch_bytes  prefetch_bytes for kMaxSmallM activation rows on the 32-element block types
//                   (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), whose blocks are small; 2 <= n < kMaxSmallM rows ask
//                   kMaxSmallM / n times as far ahead (fewer rows spend less time on a block).
//   small_passes_32 up to how many passes of the few-row kernels (kMaxSmallM activation rows each) a
//                   matmul of those types runs before it packs panels instead (gemm_type; 0: the ISA's
//                   kSmallPasses).
// Intel Xeon (model 167): two panels (random 1.1B files, 2 threads: Q4_K_M 37.7 -> 40.6 tok/s) and 1 KiB
// (Q6_K 22.8 -> 27.8, Q4_0 41.5 -> 45.5), no spread (not measured there): {true, 1024, 0, 1024, 0}, used on
// every non-AMD CPU.
// AMD EPYC Zen 4 (family 25 model 17): {false, 64, 1728, 2048, 6}. One panel: from {true, 1024}, 1 thread, tok/s,
// SmolLM2 Q4_0 137 -> 261 (its AVX2 path 83 -> 196), Q8_0 97 -> 169, random 1.1B Q4_0 24 -> 40, with
// prefetch off. Then 64 bytes, which asks for each block's lines as the block starts, all at once:
// random 1.1B Q6_K 7.4 -> 17.6 (256 bytes: 12.4, 1 KiB: 9.0, off: 7.4), Q4_K_M (a quarter Q6_K) 23.5 ->
// 33.5 (2 threads 39 -> 52), the other types unchanged. The kernel's own loads reach a Q6_K block's lines
// a unit at a time, and out of order (its scales sit at the block's end), which the prefetchers there
// do not follow: without the early requests a core waits on one line after another. Then the spread,
// 1728 bytes (medians of 10-12 paired alternations with 0 in one process, tok/s): random 1.1B Q6_K
// +41 % at one thread (16.7 -> 24.5) and +24 % at two (32.6 -> 40.1), Q4_K_M +7 % (33.5 -> 36.2) and
// +10 % (53.8 -> 58.4), Qwen2.5-Coder-0.5B Q4_K_M unchanged, the AVX2 path's Q6_K +6 %; in a trial
// build Q3_K_M +12 %, Q2_K +19 %, and 2304 bytes as good on Q6_K but 0.96-0.98 on Q4_K_M. Spread for
// Q4_K too (scales at the head): Q4_K_S +3-4 %, within the noise of a Q4_0 control (+3 %): not kept.
// Without the 64 bytes at each block's start the spread alone halved Q6_K's speed.
// Then rows_prefetch_bytes, 2048: with two or more activation rows the kernel spends long enough on each
// small block (a panel's Q4_0 block is 288 bytes, Q8_0's 544) that 64 bytes ahead leaves it waiting on
// memory. Q4_0 32768 x 4096 (from memory), one thread, GMAC/s, 64 -> 2048 bytes: 2 rows 49 -> 55, 4 rows
// 67 -> 87, 8 rows 80 -> 129 (two threads 153 -> 273); 8 rows Q8_0 68 -> 98, Q5_0 71 -> 114, Q4_1 76 ->
// 113; one row unchanged (31.0 / 31.3), so prefetch_bytes stays. Not for K-quants: their 64 bytes already
// ask for the whole next 2304-byte block, and further was slower (Q4_K 2 rows 63 -> 43). SmolLM2 decode
// of 8 sequences at 30-94 keys, 2 threads, paired medians of 12, ms a step: Q4_0 9.89 -> 8.91, Q8_0
// 10.84 -> 9.76 (4096 bytes: 8.92 and 10.15); the AVX2 path's Q4_0 11.38 -> 10.65. On Intel CPUs
// rows_prefetch_bytes is prefetch_bytes (not measured there). Then the distance scaled for fewer rows
// (2026-11-29): SmolLM2 decode steps, 2 threads, paired medians of 8, 2048 bytes at every row count
// against 8192 at 2 rows and 4096 at 4 (what the scaling gives): Q4_0 2 sequences -4.4 %, 4 -3.6 %,
// Q8_0 2 -1.6 %, 4 -3.0 % (8192 at 4: -4.4 %); at 8 sequences longer distances were slower (Q8_0 4096
// +3.1 %, 8192 +6.5 %). The AVX2 path (3 rows: 3072 bytes at 2) unchanged within the noise. Not measured
// on Intel, where 2 rows now ask 4 KiB ahead.
// Then small_passes_32, 6: on Zen 4 the AVX-512 kernels in passes beat packing up to 48 rows (the
// ISA's 2 passes stopped at 16): a continuous-batching step where a prompt chunk joins the decoding
// sequences has 17-40 rows. SmolLM2 Q4_0, 2 threads, paired in one process, ms a step, packed /
// passes: 17 rows 18.2 / 16.3, 24 rows 22.3 / 18.9, 32 rows 22.1 / 19.2, 40 rows 31.7 / 29.4, 48 rows
// 37.4 / 34.1; Q8_0 24 rows 18.3 / 16.1; random 1.1B Q4_0 24 rows 120 / 97, 40 rows 165 / 149. Not for
// K-quants (unpacking a K-quant block costs more: random 1.1B Q4_K_M 24 rows 139 / 147, separate runs).
// The AVX2 kernels already take 6 passes. On Intel CPUs 0 (not measured there).
struct DecodeTuning {
  bool two_panels;
  int64_t prefetch_bytes;
  int64_t spread_bytes;
  int64_t rows_prefetch_bytes;
  int small_passes_32;
};
// The tuning in use: the vendor's unless set_decode_tuning changed it (tests: every choice gives the same
// results bit for bit).
DecodeTuning decode_tuning();
void set_decode_tuning(DecodeTuning t);

// Prefetches `bytes` bytes from p spread over `steps` steps of a kernel's loop: the weight rows the
// next tile will read (in a dense tensor, the rows after this tile's). A tile reads a few rows at a
// time, a few bytes of each per step, and such short interleaved streams do not train the hardware
// prefetchers: without this, decode stalls on memory at a fraction of the bandwidth.
// The lines go to L1, or to L2 where the next tile's bytes would not fit in L1 beside this one's.
class RowPrefetch {
 public:
  RowPrefetch(const void* p, int64_t bytes, int64_t steps)
      : p_(static_cast<const char*>(p)), lines_(bytes / 64), per_step_((lines_ + steps - 1) / (steps > 0 ? steps : 1)),
        to_l2_(bytes > kL1Bytes) {}
  PE_INLINE void step(int64_t s) const {
    for (int64_t l = s * per_step_; l < lines_ && l < (s + 1) * per_step_; l++) {
      if (to_l2_) __builtin_prefetch(p_ + 64 * l, 0, 2);
      else __builtin_prefetch(p_ + 64 * l, 0, 3);
    }
  }

  // Float weights, one row, 2 threads, Zen 4 (GB/s into L1 / into L2): F16 rows of 576 (a 4-row tile's
  // next tile 4.6 KB) 46 / 30, of 1536 (12 KB) 34 / 39, of 4096 (32 KB, all of L1) 26 / 35.
  static constexpr int64_t kL1Bytes = 8 << 10;

 private:
  const char* p_;
  int64_t lines_, per_step_;
  bool to_l2_;
};

// A grow-only 64-byte-aligned scratch buffer (one per thread and use: no allocation in steady state).
class ScratchBuffer {
 public:
  ScratchBuffer() = default;
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;
  ~ScratchBuffer();
  // Out of line on purpose: an inline copy compiled in an AVX-512 file could be the one the linker keeps.
  void* get(size_t bytes);

 private:
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Below this max|x| a block quantizes to zeros: 127 / max|x| would overflow to Inf (max|x| under
// 3.7e-37, subnormals included) and Inf * x cannot be converted to an integer. Such a block adds
// under 1e-30 times the weights to any output.
constexpr float kMinQuantAmax = 1e-30f;

// The XSub of an activation block that holds a NaN or Inf (see QuantizedX).
inline XSub non_finite_xsub() {
  const float nan = __builtin_nanf("");
  return XSub{0, nan, nan, 0.0f};
}

// Scalar reference for one activation row (shared by the portable path and the SIMD paths' tails).
void quantize_x_row_ref(const float* x, int64_t k, const QuantScheme& s, int8_t* q, XSub* sub);

}  // namespace pe::cpu
