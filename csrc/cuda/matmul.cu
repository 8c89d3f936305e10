// y = x W^T on the GPU, for every weight type of cpu::matmul_supports.
//
// Design. Weights stay in their GGUF blocks and are dequantised in registers, one 32-element chunk
// per thread at a time, by cuda/quant_blocks.cuh (the same decoders the host tests check bit for bit
// against the CPU backend).
//   * m <= 8 (decode): gemv_kernel. Memory-bound, so every weight byte is read once for all m
//     rows of x, and the design is about keeping many wide, coalesced loads in flight. A warp owns
//     two weight rows. It copies the contiguous bytes of the next 32 chunks of each row (a "span";
//     for the K-quants 4 whole super-blocks) into its own shared-memory ring with cp.async, 16 bytes
//     per lane (cuda/gemv_span.cuh plans the pieces for any 2-byte alignment), keeping up to
//     kGemvStages - 1 further spans in flight while it computes one, so the bytes in flight per SM
//     do not hinge on occupancy. Each lane then takes its chunk of the staged span:
//       - quantized weights (the integer path, cuda/quant_dot.cuh): x was first rounded to 8 bits
//         per 32-element chunk by quantize_x_kernel (d = max|x| / 127, as the CPU backend does),
//         into XRecords that every block reads from global memory (L1 / L2 hits); the lane writes
//         its weight chunk as small integers with one or two scales and offsets and multiplies
//         it with dp4a, four products per instruction;
//       - float weights: the lane converts its chunk to fp32 (quant_blocks.cuh) and FMAs it with x,
//         which the block stages in shared memory one slice of columns at a time (padded so that
//         lanes reading different chunks hit different banks).
//     Accumulators live in registers (the kernel is templated on 1, 2, 4 or 8 rows); a warp
//     shuffle sums the lanes. Shared memory is dynamic (up to ~70 KiB a block for float weights
//     at m = 8).
//     The first version (git history) had the same arithmetic but each lane read its chunk straight
//     from global memory with 16-bit loads, lanes one chunk apart: a warp-wide load touched ~18
//     sectors for 64 useful bytes (Q4_0), and few bytes were in flight per SM.
//   * m > 8 (prefill): gemm_mma_kernel, on tensor cores (mma.sync.m16n8k16, f16 in, f32 sums;
//     sm_80 and newer, older GPUs run the GEMV 8 rows at a time). 128 x 128 output tiles, K steps
//     of 64, 8 warps of 64 x 32; x rounded to half once per call, then copied tile by tile with
//     cp.async; each thread dequantises one W chunk per step into registers while the warps
//     multiply the previous step's tiles, two shared-memory stages, split-K for small grids
//     (cuda/gemm_tile.cuh, mirrored on the host by cuda_host_gemm). F32 weights take
//     gemm_f32_kernel instead, which keeps fp32 throughout.
// Weights are not repacked for the GEMM: they stay in the GGUF blocks that the GEMV streams at the
// memory rate, so one copy in GPU memory serves both (a second, GEMM-shaped copy would double the
// weights' footprint on the small GPUs this engine is for). A grid of fewer tiles than SMs (m <= 128
// and a 4096-row matrix: 32 tiles) is split along K (gemm_splits). Left for later: ldmatrix, int8 MMA.
// Measured on an H200 (benchmarks/bench_gpu.py and profile_gpu_decode.py, 7B-shaped model, whole
// on the GPU): the first GEMV (fp32 decoding, no staging) ran a 4096 x 4096 Q4_K matrix in 19 us
// (ncu); staging took the 7B decode from 112 to 130 tok/s (Q4_K) and 154 to 156 (Q4_0), the GEMV
// then at 17.7 us a call on average (~0.93 TB/s), bound by its int-to-float conversions. The
// integer path: 10.0 us a call (~1.65 TB/s), 9.7 with 4 stages; decode 156 -> 227 tok/s (Q4_0),
// 130 -> 198 (Q4_K), with 1.2 us per call of quantize_x_kernel. The first GEMM (WMMA m16n16k16,
// 64 x 64 tiles, one stage, x converted to half by every block, git history) ran at ~37 TFLOP/s
// (Q4_K, m = 512) and prefilled the 7B at 27 TFLOP/s; gemm_mma_kernel has not yet run on a GPU.
#include "cuda/common.cuh"
#include "cuda/gemm_tile.cuh"
#include "cuda/gemv_span.cuh"
#include "cuda/ops.h"
#include "cuda/quant_blocks.cuh"
#include "cuda/quant_dot.cuh"
#include "cuda/reduce.cuh"

namespace pe::cuda {

namespace {

// ---- GEMV (m <= 8) ------------------------------------------------------------------------------------

constexpr int kGemvMaxM = kGemvMaxRows;
// x slices in shared memory: chunk i of row r of the slice at xs[r * slice_stride + i * 36]. The 4
// floats of padding per chunk put the float4 reads of the 8 lanes of a quarter-warp (lanes on
// consecutive chunks) on distinct banks; 144-byte chunk strides keep them 16-byte aligned.
constexpr int kPaddedChunk = kChunk + 4;

// ---- GEMV (m <= 8): weight bytes staged in shared memory -----------------------------------------------
//
// A first version's lanes each read a whole chunk straight from global memory with 16-bit loads, lanes
// one chunk apart: a warp-wide load instruction touches 18 sectors (Q4_0) for 64 useful bytes, and
// with 16 rows per block a 4096-row matrix is 256 blocks, too few bytes in flight per SM to cover
// DRAM latency. Here a warp first copies the contiguous bytes of the next kSpanChunks (32) chunks of
// each of its rows into its own shared-memory buffer with cp.async, 16 bytes per lane per
// instruction (a warp-wide instruction reads 512 contiguous bytes), and only then do the lanes
// decode their chunks from shared memory with the same decoders. The buffers form a ring of
// kGemvStages<T> spans per row: a warp keeps the next spans' copies in flight while it computes one,
// so bytes in flight no longer depend on occupancy (Q4_0: 3 stages x 2 rows x 576 bytes per warp).
// cp.async needs sm_80; older architectures copy synchronously (correct, not fast).
//
// A staged span sits in its buffer at its global address mod 16, so the 16-byte pieces are 16-byte
// aligned at both ends; the ragged ends of a span that does not start or end on a 16-byte boundary
// (Q3_K, Q6_K, Q4_0 rows of an odd block count, float rows of odd length) go in 8-, 4- or 2-byte
// pieces (cuda/gemv_span.cuh; the 2-byte ones, only for 2-byte aligned spans, through registers).
// The decoders then read the buffer as a row of their own: chunk `lane` of the span, with the row
// length made relative to the span so that a float row's partial last chunk is still cut short.
// Two rows per warp: their copies are in flight together and each x value read from shared memory
// serves both (one row per warp with twice the warps ran 1.8x slower at m = 8 on an H200, in the
// first version). Lane l sums chunks l, l + 32, ... of each slice, in fp32 FMAs.

constexpr int kGemvRowsPerWarp = 2;
// F32 spans are 4 KiB per row: 4 warps keep a block's shared memory under 99 KiB (sm_86/89's limit).
template <GGMLType T>
constexpr int kGemvWarps = T == GGMLType::F32 ? 4 : 8;
// One row's staging buffer: a whole span, shifted by up to 15 bytes, in whole 16-byte units.
template <GGMLType T>
constexpr int kGemvRowBuf = (span_max_bytes(T) + 15) / 16 * 16 + 16;
// Quantized weights take the integer path (cuda/quant_dot.cuh): x, rounded to 8 bits by
// quantize_x_kernel, is read as XRecords straight from global memory (a few KiB that every block
// reads: L1 / L2 hits), so there are no x slices in shared memory.
template <GGMLType T>
constexpr bool kGemvInt = !chunk_type_is_float(T);
// Stages per warp, at most 4. Float weights: about 4.5 KiB of staging per warp (1 stage: their spans
// are 2-4 KiB per row). The integer path keeps no x in shared memory and gets 6 KiB: 4 stages for
// Q4_0 / Q4_K (a 4096-column row, 4 spans, is in flight nearly whole), 3 for Q6_K, 2 for Q8_0;
// 8 warps x 6 KiB still leave two blocks per SM on sm_86 / sm_89 (100 KiB).
template <GGMLType T>
constexpr int kGemvStageBudget = kGemvInt<T> ? 6144 : 4608;
constexpr int clamp_int(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }
template <GGMLType T>
constexpr int kGemvStages = clamp_int(kGemvStageBudget<T> / (kGemvRowsPerWarp * kGemvRowBuf<T>), 1, 4);
// x slices: whole spans, about 18 KiB (at least one span: 36 KiB at m = 8), laid out as in
// the first version. A smaller slice than its 36 KiB leaves room for the staging buffers and more
// blocks per SM; at m = 1 a 4096-column row is still a single slice.
constexpr int kGemvXBudget = 18432;
constexpr int kSpanXBytes = kSpanChunks * kPaddedChunk * 4;  // one span of one x row
template <int M>
constexpr int kGemvSliceChunks = clamp_int(kGemvXBudget / (M * kSpanXBytes), 1, 1 << 20) * kSpanChunks;
template <GGMLType T, int M>
constexpr int kGemvSmemBytes = (kGemvInt<T> ? 0 : M * kGemvSliceChunks<M> * kPaddedChunk * 4) +
                               kGemvWarps<T> * kGemvStages<T> * kGemvRowsPerWarp * kGemvRowBuf<T>;

// cp.async of N bytes (4, 8 or 16; src and dst N-byte aligned) from global to shared memory. The
// 16-byte form bypasses L1 (.cg): weight bytes are read once.
template <int N>
__device__ __forceinline__ void copy_async(uint8_t* dst, const uint8_t* src) {
#if __CUDA_ARCH__ >= 800
  const unsigned d = unsigned(__cvta_generic_to_shared(dst));
  if constexpr (N == 16)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
  else
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(d), "l"(src), "n"(N) : "memory");
#else
  if constexpr (N == 16) *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
  else if constexpr (N == 8) *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(src);
  else *reinterpret_cast<uint32_t*>(dst) = *reinterpret_cast<const uint32_t*>(src);
#endif
}

__device__ __forceinline__ void copy_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's most recent commit groups are still in flight.
template <int N>
__device__ __forceinline__ void copy_async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// The warp copies the n bytes at src (2-byte aligned) to buf + (src mod 16) (buf 16-byte aligned).
__device__ __forceinline__ void stage_span(uint8_t* buf, const uint8_t* src, int n, int lane) {
  const int mis = int(reinterpret_cast<uintptr_t>(src) & 15);
  uint8_t* dst = buf + mis;
  for_each_span_piece(mis, n, lane, [&](int off, int size) {
    if (size == 16) copy_async<16>(dst + off, src + off);
    else if (size == 8) copy_async<8>(dst + off, src + off);
    else if (size == 4) copy_async<4>(dst + off, src + off);
    else *reinterpret_cast<uint16_t*>(dst + off) = *reinterpret_cast<const uint16_t*>(src + off);
  });
}

// One warp per 32-element chunk of x (n_rows x n_chunks of them): its XRecord (cuda/quant_dot.cuh).
// Lane l holds element l; max|x| and the two half sums are single warp reductions.
constexpr int kQuantizeThreads = 256;
__global__ void __launch_bounds__(kQuantizeThreads)
    quantize_x_kernel(const float* __restrict__ x, int64_t ldx, int64_t n_rows, int64_t n_chunks,
                      XRecord* __restrict__ out) {
  const int64_t task = int64_t(blockIdx.x) * (kQuantizeThreads / 32) + threadIdx.x / 32;
  if (task >= n_rows * n_chunks) return;  // the whole warp leaves together
  const int lane = threadIdx.x % 32;
  const int64_t r = task / n_chunks, c = task % n_chunks;
  const float v = x[r * ldx + c * kChunk + lane];
  // |x| as bits: the integer max is the float max, and a NaN (above inf) wins and spreads to the sums.
  const float amax = __uint_as_float(warp_max_u32(__float_as_uint(fabsf(v))));
  const int q = x_quant_value(v, x_quant_factor(amax));
  XRecord& rec = out[task];
  rec.q[lane] = int8_t(q);
  const int s0 = warp_sum_i32(lane < 16 ? q : 0), s1 = warp_sum_i32(lane < 16 ? 0 : q);
  if (lane == 0) {
    const float d = amax / 127.0f;
    rec.d = d;
    rec.dsum[0] = d * float(s0);
    rec.dsum[1] = d * float(s1);
    rec.pad = 0.0f;
  }
}

// y[r][row] = sum_k x[r][k] * W[row][k] for r < m <= M, rows [blockIdx.x * kRowsPerBlock, +kRowsPerBlock).
// M (1, 2, 4 or 8) sizes the accumulators; m is the rows of x there are.
// Float weights read x (fp32) through shared-memory slices; quantized weights read xrec, x's
// XRecords (row r's chunk c at xrec[r * n_chunks + c]), and multiply with dp4a.
// The launch bounds ask for 16 warps per SM, i.e. at most 128 registers per thread: without the
// minimum, ptxas held the 4-warp F32 kernel at m = 8 to 96 registers and spilled.
template <GGMLType T, int M>
__global__ void __launch_bounds__(kGemvWarps<T> * 32, 16 / kGemvWarps<T>)
    gemv_kernel(const uint8_t* __restrict__ w, int64_t w_rows, int64_t cols, size_t w_stride,
                   const float* __restrict__ x, int64_t ldx, const XRecord* __restrict__ xrec, int m,
                   float* __restrict__ y, int64_t ldy) {
  constexpr bool kInt = kGemvInt<T>;
  constexpr int kThreads = kGemvWarps<T> * 32;
  constexpr int kRowsPerBlock = kGemvWarps<T> * kGemvRowsPerWarp;
  constexpr int kStages = kGemvStages<T>;
  constexpr int kRowBuf = kGemvRowBuf<T>;
  constexpr int kSliceChunks = kInt ? 1 << 30 : kGemvSliceChunks<M>;  // integer path: one "slice", the row
  constexpr int kSliceStride = kInt ? 0 : kSliceChunks * kPaddedChunk;  // floats per x row in shared memory
  static_assert(kSliceChunks % kSpanChunks == 0, "a span must not straddle two x slices");
  static_assert(kGemvSmemBytes<T, M> <= 99 * 1024, "GEMV shared memory exceeds sm_86/89's 99 KiB per block");
  extern __shared__ __align__(16) uint8_t gemv_smem[];
  float* xs = reinterpret_cast<float*>(gemv_smem);

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  // Staging buffer of row i of stage st: stage + (st * kGemvRowsPerWarp + i) * kRowBuf.
  uint8_t* stage = gemv_smem + (kInt ? 0 : M * kSliceStride * 4) + warp * (kStages * kGemvRowsPerWarp * kRowBuf);
  const int64_t row0 = int64_t(blockIdx.x) * kRowsPerBlock + warp * kGemvRowsPerWarp;
  // A row past the end of W reads the last row again (its sum is not stored): no branch in the loop.
  const uint8_t* rows[kGemvRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; i++) rows[i] = w + (row0 + i < w_rows ? row0 + i : w_rows - 1) * w_stride;
  const int64_t n_chunks = (cols + kChunk - 1) / kChunk;
  const int64_t n_spans = (n_chunks + kSpanChunks - 1) / kSpanChunks;

  // Copies span s of the warp's rows into stage s % kStages. Always one commit group per call, even
  // past the last span, so that copy_async_wait<kStages - 1> always means "span s has landed".
  auto issue = [&](int64_t s) {
    if (s < n_spans) {
      int64_t b, e;
      span_bytes(T, cols, s, &b, &e);
#pragma unroll
      for (int i = 0; i < kGemvRowsPerWarp; i++)
        stage_span(stage + (int(s % kStages) * kGemvRowsPerWarp + i) * kRowBuf, rows[i] + b, int(e - b), lane);
    }
    copy_async_commit();
  };
  for (int s = 0; s < kStages - 1; s++) issue(s);

  float acc[kGemvRowsPerWarp][M];
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; i++)
#pragma unroll
    for (int r = 0; r < M; r++) acc[i][r] = 0.0f;

  for (int64_t c0 = 0; c0 < n_chunks; c0 += kSliceChunks) {
    const int nc = int(n_chunks - c0 < kSliceChunks ? n_chunks - c0 : kSliceChunks);
    if constexpr (!kInt) {
      const int64_t k0 = c0 * kChunk;
      __syncthreads();  // every warp is done with the previous slice
      for (int r = 0; r < m; r++) {
        const float* xr = x + r * ldx;
        for (int k = threadIdx.x; k < nc * kChunk; k += kThreads)
          xs[r * kSliceStride + (k / kChunk) * kPaddedChunk + k % kChunk] = k0 + k < cols ? xr[k0 + k] : 0.0f;
      }
      __syncthreads();
    }

    for (int sc = 0; sc < nc; sc += kSpanChunks) {
      const int64_t s = (c0 + sc) / kSpanChunks;
      __syncwarp();  // every lane is done with the stage that span s + kStages - 1 overwrites
      issue(s + kStages - 1);
      copy_async_wait<kStages - 1>();
      __syncwarp();  // span s's bytes, copied by all lanes, are visible to all lanes
      const int c = sc + lane;  // this lane's chunk in the slice
      if constexpr (kInt) {
        if (c < nc) {
          int64_t b, e;
          span_bytes(T, cols, s, &b, &e);
          IntChunk wq[kGemvRowsPerWarp];
#pragma unroll
          for (int i = 0; i < kGemvRowsPerWarp; i++) {
            const uint8_t* staged = stage + (int(s % kStages) * kGemvRowsPerWarp + i) * kRowBuf +
                                    (reinterpret_cast<uintptr_t>(rows[i] + b) & 15);
            int_chunk<T>(staged, lane, wq[i]);
          }
#pragma unroll
          for (int r = 0; r < M; r++) {
            if (r >= m) break;
            const uint4* rec = reinterpret_cast<const uint4*>(xrec + r * n_chunks + c0 + c);
            const uint4 q0 = __ldg(rec), q1 = __ldg(rec + 1);
            const uint32_t xq[8] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w};
            const float4 meta = __ldg(reinterpret_cast<const float4*>(rec + 2));  // d, dsum[0], dsum[1]
#pragma unroll
            for (int i = 0; i < kGemvRowsPerWarp; i++)
              acc[i][r] += dot_chunk<int_chunk_has_halves(T)>(wq[i], xq, meta.x, meta.y, meta.z);
          }
        }
      } else if (c < nc) {
        int64_t b, e;
        span_bytes(T, cols, s, &b, &e);
        float wv[kGemvRowsPerWarp][kChunk];
#pragma unroll
        for (int i = 0; i < kGemvRowsPerWarp; i++) {
          const uint8_t* staged = stage + (int(s % kStages) * kGemvRowsPerWarp + i) * kRowBuf +
                                  (reinterpret_cast<uintptr_t>(rows[i] + b) & 15);
          dequantize_chunk<T>(staged, span_cols(cols, s), lane, wv[i]);
        }
#pragma unroll
        for (int r = 0; r < M; r++) {
          if (r >= m) break;
          const float4* xc = reinterpret_cast<const float4*>(xs + r * kSliceStride + c * kPaddedChunk);
#pragma unroll
          for (int q = 0; q < kChunk / 4; q++) {
            const float4 xv = xc[q];
#pragma unroll
            for (int i = 0; i < kGemvRowsPerWarp; i++) {
              float a = acc[i][r];
              a = fmaf(wv[i][4 * q + 0], xv.x, a);
              a = fmaf(wv[i][4 * q + 1], xv.y, a);
              a = fmaf(wv[i][4 * q + 2], xv.z, a);
              a = fmaf(wv[i][4 * q + 3], xv.w, a);
              acc[i][r] = a;
            }
          }
        }
      }
    }
  }
  copy_async_wait<0>();  // no copy may still target shared memory when the block exits

#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; i++) {
#pragma unroll
    for (int r = 0; r < M; r++) {
      const float s = warp_sum(acc[i][r]);
      const int64_t row = row0 + i;
      if (lane == 0 && row < w_rows && r < m) y[r * ldy + row] = s;
    }
  }
}

template <GGMLType T, int M>
void launch_gemv_m(cudaStream_t stream, const Tensor& w, const float* x, int64_t ldx, const XRecord* xrec, int m,
                   float* y, int64_t ldy) {
  constexpr int kSmem = kGemvSmemBytes<T, M>;
  // Above 48 KiB a kernel must opt in to dynamic shared memory (once: the engine uses one device).
  static const bool opted_in = [] {
    if (kSmem > 48 * 1024)
      PE_CUDA_CHECK(cudaFuncSetAttribute(gemv_kernel<T, M>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem));
    return true;
  }();
  (void)opted_in;
  const int64_t blocks = ceil_div(w.rows, kGemvWarps<T> * kGemvRowsPerWarp);
  PE_CHECK(blocks <= 0x7fffffff, Error, "matmul: too many weight rows for one grid (", w.rows, ")");
  gemv_kernel<T, M><<<unsigned(blocks), kGemvWarps<T> * 32, kSmem, stream>>>(
      static_cast<const uint8_t*>(w.data), w.rows, w.cols, w.row_stride, x, ldx, xrec, m, y, ldy);
  PE_CUDA_LAUNCHED();
}

// Workspace slot of the XRecords of x (attention.cu holds slots 0 and 1).
constexpr int kXRecordSlot = 2;

template <GGMLType T>
void launch_gemv(Executor& ex, const Tensor& w, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy) {
  const cudaStream_t stream = stream_of(ex);
  const XRecord* xrec = nullptr;
  if constexpr (kGemvInt<T>) {
    const int64_t n_chunks = w.cols / kChunk;  // quantized rows are whole blocks of 32 or 256
    auto* rec = static_cast<XRecord*>(ex.workspace(kXRecordSlot, size_t(m * n_chunks) * sizeof(XRecord)));
    const int64_t blocks = ceil_div(m * n_chunks, kQuantizeThreads / 32);
    PE_CHECK(blocks <= 0x7fffffff, Error, "matmul: rows of ", w.cols, " columns are too long for one grid");
    quantize_x_kernel<<<unsigned(blocks), kQuantizeThreads, 0, stream>>>(x, ldx, m, n_chunks, rec);
    PE_CUDA_LAUNCHED();
    xrec = rec;
  }
  // Accumulators for 1, 2, 4 or 8 rows: four kernels per type, not eight.
  if (m == 1) return launch_gemv_m<T, 1>(stream, w, x, ldx, xrec, 1, y, ldy);
  if (m == 2) return launch_gemv_m<T, 2>(stream, w, x, ldx, xrec, 2, y, ldy);
  if (m <= 4) return launch_gemv_m<T, 4>(stream, w, x, ldx, xrec, int(m), y, ldy);
  PE_CHECK(m <= kGemvMaxM, Error, "matmul: gemv takes 1 to ", kGemvMaxM, " rows of x, got ", m);
  launch_gemv_m<T, 8>(stream, w, x, ldx, xrec, int(m), y, ldy);
}

// ---- tensor-core GEMM (m > 8) ---------------------------------------------------------------------------
//
// Half inputs: x and the dequantised weights are rounded to half (11-bit significand, so about 5e-4
// relative per product) and products are summed in float. Half overflows above 65504: weights never
// get there, but an activation that large (rare outlier channels in some LLMs) would become inf.
// A bf16 or tf32 variant would trade precision for range if that ever matters.
//
// The tiling, the fragment layout and every index are in cuda/gemm_tile.cuh, which the host mirror
// (cuda_host_gemm) runs too. x is rounded to half once per matmul (x_to_half_kernel), not once per
// block: blocks copy their x tiles with cp.async straight into shared memory. Weights stay in their
// GGUF blocks (one copy serves this GEMM and the GEMV, which streams them at the memory rate): each
// thread dequantises one 32-element chunk per K step, the next step's chunk while the warps run the
// current step's MMAs, and stores it as half once they are done.

// The half pair (lo, hi) as one 32-bit word, lo in the low half (the order mma.sync reads).
__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// d += a b for one m16n8k16 tile (cuda/gemm_tile.cuh has the fragment layout).
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // launch_gemm sends older GPUs to the GEMV instead
#endif
}

// out (gemm_x_rows(m) x gemm_x_cols(cols) halves, as pairs) = x rounded to half, zeros outside it.
constexpr int kXHalfThreads = 256;
__global__ void __launch_bounds__(kXHalfThreads)
    x_to_half_kernel(const float* __restrict__ x, int64_t ldx, int64_t m, int64_t cols, uint32_t* __restrict__ out,
                     int64_t n_pairs, int64_t pairs_per_row) {
  const int64_t i = int64_t(blockIdx.x) * kXHalfThreads + threadIdx.x;
  if (i >= n_pairs) return;
  const int64_t r = i / pairs_per_row, c = i % pairs_per_row * 2;
  const float lo = r < m && c < cols ? x[r * ldx + c] : 0.0f;
  const float hi = r < m && c + 1 < cols ? x[r * ldx + c + 1] : 0.0f;
  out[i] = half2_bits(lo, hi);
}

// y (m x w_rows) = x W^T. xh: x as half (x_to_half_kernel), gemm_x_cols(cols) halves a row, rows up
// to the grid's last tile. One block per kGemmM x kGemmN tile of y and split of its K steps
// (blockIdx.z: steps [z split_steps, (z + 1) split_steps)); shared memory: two stages. With one split
// the block writes y; with several, split z writes its partial sums to part + z m w_rows (rows of
// w_rows floats) for split_k_sum_kernel.
template <GGMLType T>
__global__ void __launch_bounds__(kGemmThreads, 1)
    gemm_mma_kernel(const uint8_t* __restrict__ w, int64_t w_rows, int64_t cols, size_t w_stride,
                    const uint16_t* __restrict__ xh, int64_t m, int64_t split_steps, float* __restrict__ y,
                    int64_t ldy, float* __restrict__ part) {
  extern __shared__ __align__(16) uint16_t smem[];
  const int tid = threadIdx.x, lane = tid % 32;
  const int64_t n0 = int64_t(blockIdx.x) * kGemmN, m0 = int64_t(blockIdx.y) * kGemmM;
  const int64_t ldxh = gemm_x_cols(cols), all_steps = gemm_steps(cols);
  const int64_t first = int64_t(blockIdx.z) * split_steps;
  const int64_t steps = gemm_split_count(all_steps, split_steps, int(blockIdx.z));
  int row_x, row_w;
  gemm_warp_origin(tid / 32, row_x, row_w);

  // This thread's W chunk of every step; rows past the matrix stay zero.
  int w_row, w_half;
  gemm_w_chunk(tid, w_row, w_half);
  const uint8_t* w_ptr = n0 + w_row < w_rows ? w + (n0 + w_row) * w_stride : nullptr;
  uint32_t wh[kChunk / 2];
  auto dequant_w = [&](int64_t step) {  // step: of this split's
    float v[kChunk];
    if (w_ptr) {
      dequantize_chunk<T>(w_ptr, cols, (first + step) * (kGemmK / kChunk) + w_half, v);  // zeros past the row's end
    } else {
#pragma unroll
      for (int l = 0; l < kChunk; l++) v[l] = 0.0f;
    }
#pragma unroll
    for (int l = 0; l < kChunk / 2; l++) wh[l] = half2_bits(v[2 * l], v[2 * l + 1]);
  };
  auto store_w = [&](int stage) {  // 64 bytes at a 16-byte aligned offset (rows are 144 bytes)
    uint4* dst = reinterpret_cast<uint4*>(smem + stage * kGemmStageHalves + (kGemmM + w_row) * kGemmLd +
                                          w_half * kChunk);
#pragma unroll
    for (int q = 0; q < kChunk / 8; q++) dst[q] = make_uint4(wh[4 * q], wh[4 * q + 1], wh[4 * q + 2], wh[4 * q + 3]);
  };
  auto copy_x = [&](int64_t step, int stage) {
#pragma unroll
    for (int i = 0; i < kGemmXPieces; i++) {
      int r, c;
      gemm_x_piece(tid, i, r, c);
      copy_async<16>(reinterpret_cast<uint8_t*>(smem + stage * kGemmStageHalves + r * kGemmLd + c),
                     reinterpret_cast<const uint8_t*>(xh + (m0 + r) * ldxh + (first + step) * kGemmK + c));
    }
    copy_async_commit();
  };

  float acc[kGemmFragsM][kGemmFragsN][4];
#pragma unroll
  for (int i = 0; i < kGemmFragsM; i++)
#pragma unroll
    for (int j = 0; j < kGemmFragsN; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

  if (steps > 0) {  // (a matrix without columns: y = 0)
    copy_x(0, 0);
    dequant_w(0);
    store_w(0);
    copy_async_wait<0>();
  }
  __syncthreads();
  for (int64_t s = 0; s < steps; s++) {
    const int cur = int(s & 1);
    const bool more = s + 1 < steps;
    if (more) {  // the next step's tiles, into the other stage (its readers passed the last barrier)
      copy_x(s + 1, cur ^ 1);
      dequant_w(s + 1);
    }
    const uint16_t* st = smem + cur * kGemmStageHalves;
#pragma unroll
    for (int kk = 0; kk < kGemmK; kk += 16) {
      uint32_t a[kGemmFragsM][4], b[kGemmFragsN][2];
#pragma unroll
      for (int i = 0; i < kGemmFragsM; i++)
#pragma unroll
        for (int r = 0; r < 4; r++)
          a[i][r] = *reinterpret_cast<const uint32_t*>(st + gemm_a_offset(row_x, i, kk, lane, r));
#pragma unroll
      for (int j = 0; j < kGemmFragsN; j++)
#pragma unroll
        for (int r = 0; r < 2; r++)
          b[j][r] = *reinterpret_cast<const uint32_t*>(st + gemm_b_offset(row_w, j, kk, lane, r));
#pragma unroll
      for (int i = 0; i < kGemmFragsM; i++)
#pragma unroll
        for (int j = 0; j < kGemmFragsN; j++) mma_16816(acc[i][j], a[i], b[j]);
    }
    if (more) {
      store_w(cur ^ 1);
      copy_async_wait<0>();
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kGemmFragsM; i++)
#pragma unroll
    for (int j = 0; j < kGemmFragsN; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int64_t r = m0 + row_x + 16 * i + frag_c_row(lane, e);
        const int64_t n = n0 + row_w + 8 * j + frag_c_col(lane, e);
        if (r < m && n < w_rows) {
          if (part) part[(int64_t(blockIdx.z) * m + r) * w_rows + n] = acc[i][j][e];
          else y[r * ldy + n] = acc[i][j][e];
        }
      }
}

// y[r][n] = the sum over the splits of their partial sums, in split order.
__global__ void __launch_bounds__(kXHalfThreads)
    split_k_sum_kernel(const float* __restrict__ part, int splits, int64_t m, int64_t w_rows, float* __restrict__ y,
                       int64_t ldy) {
  const int64_t i = int64_t(blockIdx.x) * kXHalfThreads + threadIdx.x;
  if (i >= m * w_rows) return;
  float sum = part[i];
  for (int z = 1; z < splits; z++) sum += part[z * m * w_rows + i];
  y[i / w_rows * ldy + i % w_rows] = sum;
}

// ---- fp32 GEMM for F32 weights (m > 8) -----------------------------------------------------------------
//
// F32 weights ask for F32 results: the tensor-core path would round both factors to half (a 7-layer
// F32 model then drifts ~1% of the logit scale from transformers). F32 weights are for references and
// tests, not speed, so this is a plain shared-memory tiled SIMT GEMM: 64 x 64 output tiles, K steps
// of 16, each thread 4 x 4 outputs strided by 16 (conflict-free shared reads, coalesced writes).

constexpr int kF32Tile = 64;
constexpr int kF32TileK = 16;
constexpr int kF32Threads = 256;

__global__ void __launch_bounds__(kF32Threads) gemm_f32_kernel(const uint8_t* __restrict__ w, int64_t w_rows,
                                                               int64_t cols, size_t w_stride,
                                                               const float* __restrict__ x, int64_t m, int64_t ldx,
                                                               float* __restrict__ y, int64_t ldy) {
  __shared__ float xs[kF32TileK][kF32Tile + 1];  // transposed tiles: [k][row]
  __shared__ float ws[kF32TileK][kF32Tile + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t n0 = int64_t(blockIdx.x) * kF32Tile;
  const int64_t m0 = int64_t(blockIdx.y) * kF32Tile;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; i++)
#pragma unroll
    for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < cols; k0 += kF32TileK) {
    for (int e = tid; e < kF32Tile * kF32TileK; e += kF32Threads) {
      const int r = e / kF32TileK, k = e % kF32TileK;
      const int64_t gk = k0 + k, gm = m0 + r, gn = n0 + r;
      xs[k][r] = gm < m && gk < cols ? x[gm * ldx + gk] : 0.0f;
      ws[k][r] = gn < w_rows && gk < cols ? reinterpret_cast<const float*>(w + gn * w_stride)[gk] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kF32TileK; k++) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; i++) a[i] = xs[k][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; j++) b[j] = ws[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; i++) {
    const int64_t gr = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; j++) {
      const int64_t gn = n0 + tx + 16 * j;
      if (gr < m && gn < w_rows) y[gr * ldy + gn] = acc[i][j];
    }
  }
}

// Workspace slots of x's half copy and of split-K's partial sums for the tensor-core GEMM.
constexpr int kXHalfSlot = 3;
constexpr int kGemmPartSlot = 4;


// Whether the device runs gemm_mma_kernel<T>: mma.sync.m16n8k16 and the 72 KiB of shared memory a
// block takes need sm_80, and it is the image loaded for this device that must have them (a build
// for older architectures only, JIT-compiled for a newer GPU, has the __trap() branch). Asked once
// per type: the engine uses one device.
template <GGMLType T>
bool device_runs_gemm() {
  static const bool runs = [] {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, gemm_mma_kernel<T>) != cudaSuccess) {
      (void)cudaGetLastError();  // no image for this device: leave no error behind for the next check
      return false;
    }
    return attr.ptxVersion >= 80 && attr.binaryVersion >= 80;
  }();
  return runs;
}

template <GGMLType T>
void launch_gemm(Executor& ex, const Tensor& w, const float* x, int64_t ldx, int64_t m, float* y, int64_t ldy) {
  const cudaStream_t stream = stream_of(ex);
  const uint8_t* wp = static_cast<const uint8_t*>(w.data);
  // gridDim.y is at most 65535: rows of x beyond that many tiles go in further launches.
  if constexpr (T == GGMLType::F32) {
    constexpr int64_t kMaxRows = int64_t(65535) * kF32Tile;
    const int64_t n_tiles = ceil_div(w.rows, kF32Tile);
    PE_CHECK(n_tiles <= 0x7fffffff, Error, "matmul: too many weight rows for one grid (", w.rows, ")");
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const int64_t mr = m - r0 < kMaxRows ? m - r0 : kMaxRows;
      const dim3 grid(unsigned(n_tiles), unsigned(ceil_div(mr, kF32Tile)));
      gemm_f32_kernel<<<grid, kF32Threads, 0, stream>>>(wp, w.rows, w.cols, w.row_stride, x + r0 * ldx, mr, ldx,
                                                        y + r0 * ldy, ldy);
      PE_CUDA_LAUNCHED();
    }
  } else {
    if (!device_runs_gemm<T>()) {  // older GPUs: the GEMV, kGemvMaxM rows at a time (weights read m / 8 times)
      for (int64_t r0 = 0; r0 < m; r0 += kGemvMaxM)
        launch_gemv<T>(ex, w, x + r0 * ldx, ldx, m - r0 < kGemvMaxM ? m - r0 : kGemvMaxM, y + r0 * ldy, ldy);
      return;
    }
    static const bool opted_in = [] {  // above 48 KiB a kernel must opt in (once: one device)
      PE_CUDA_CHECK(cudaFuncSetAttribute(gemm_mma_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         kGemmSmemBytes));
      return true;
    }();
    (void)opted_in;
    const int64_t n_tiles = ceil_div(w.rows, kGemmN);
    PE_CHECK(n_tiles <= 0x7fffffff, Error, "matmul: too many weight rows for one grid (", w.rows, ")");
    constexpr int64_t kMaxRows = int64_t(65535) * kGemmM;
    const int64_t ldxh = gemm_x_cols(w.cols);
    const int64_t rows_h = gemm_x_rows(m < kMaxRows ? m : kMaxRows);
    auto* xh = static_cast<uint16_t*>(ex.workspace(kXHalfSlot, size_t(rows_h * ldxh) * sizeof(uint16_t)));
    for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
      const int64_t mr = m - r0 < kMaxRows ? m - r0 : kMaxRows;
      const int64_t n_pairs = gemm_x_rows(mr) * ldxh / 2;
      x_to_half_kernel<<<unsigned(ceil_div(n_pairs, kXHalfThreads)), kXHalfThreads, 0, stream>>>(
          x + r0 * ldx, ldx, mr, w.cols, reinterpret_cast<uint32_t*>(xh), n_pairs, ldxh / 2);
      PE_CUDA_LAUNCHED();
      const int64_t m_tiles = ceil_div(mr, kGemmM), steps = gemm_steps(w.cols);
      const int splits = gemm_splits(n_tiles * m_tiles, steps, multiprocessor_count());
      const int64_t split_steps = gemm_split_steps(steps, splits);
      float* part = splits > 1 ? static_cast<float*>(ex.workspace(kGemmPartSlot, size_t(splits * mr * w.rows) * 4))
                               : nullptr;
      const dim3 grid(static_cast<unsigned>(n_tiles), static_cast<unsigned>(m_tiles), static_cast<unsigned>(splits));
      gemm_mma_kernel<T><<<grid, kGemmThreads, kGemmSmemBytes, stream>>>(wp, w.rows, w.cols, w.row_stride, xh, mr,
                                                                         split_steps, y + r0 * ldy, ldy, part);
      PE_CUDA_LAUNCHED();
      if (part) {
        split_k_sum_kernel<<<unsigned(ceil_div(mr * w.rows, kXHalfThreads)), kXHalfThreads, 0, stream>>>(
            part, splits, mr, w.rows, y + r0 * ldy, ldy);
        PE_CUDA_LAUNCHED();
      }
    }
  }
}

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

bool matmul_supports(GGMLType t) { return chunk_type_supported(t); }

void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y, MatmulRounding) {
  PE_CHECK(cuda::matmul_supports(w.type), UnsupportedModelError, "matmul: no CUDA kernel for weight type ",
           type_name(uint32_t(w.type)));
  const int64_t m = x.rows;
  if (m == 0 || w.rows == 0) return;
  const size_t wa = size_t(chunk_row_alignment(w.type));
  PE_CHECK(aligned(w.data, wa) && w.row_stride % wa == 0, Error, "matmul: ", type_name(uint32_t(w.type)),
           " weight rows must be ", wa, "-byte aligned on the GPU");
  PE_CHECK(aligned(x.data, 4) && x.row_stride % 4 == 0 && aligned(y.data, 4) && y.row_stride % 4 == 0, Error,
           "matmul: x and y rows must be 4-byte aligned");
  const float* xp = static_cast<const float*>(x.data);
  float* yp = static_cast<float*>(y.data);
  const int64_t ldx = x.ld(), ldy = y.ld();
  visit_chunk_type(w.type, [&](auto type) {
    constexpr GGMLType T = decltype(type)::value;
    if (m <= kGemvMaxM) launch_gemv<T>(ex, w, xp, ldx, m, yp, ldy);
    else launch_gemm<T>(ex, w, xp, ldx, m, yp, ldy);
  });
}

}  // namespace pe::cuda
