// y = x W^T on the GPU, for every weight type of cpu::matmul_supports.
//
// Design. Weights stay in their GGUF blocks and are dequantised in registers, one 32-element chunk
// per thread at a time, by cuda/quant_blocks.cuh (the same decoders the host tests check bit for bit
// against the CPU backend).
//   * m <= 8 (decode): gemv_kernel. Memory-bound, so every weight byte is read once for all m rows
//     of x. A warp owns two weight rows; its lanes stride over the chunks of those
//     rows and FMA them with x, which the block stages in shared memory one slice of columns at a
//     time (padded so that lanes reading different chunks hit different banks). Accumulators live
//     in registers (the kernel is templated on m); a warp shuffle sums the lanes.
//   * m > 8 (prefill): gemm_wmma_kernel (gemm_f32_kernel for F32 weights, which keeps fp32). 64 x 64 output tiles, K steps of 64: the block converts an
//     x tile to half and dequantises a W tile to half in shared memory, then four warps run
//     m16n16k16 tensor-core MMAs with float accumulation. Edges are zero-padded.
// Left for later: dp4a / int8 MMA on x quantised to 8 bits (as the CPU does), weight repacking at
// load time (aligned 16-byte loads, a tensor-core-friendly layout, no per-chunk scale decoding),
// mma.sync with ldmatrix and cp.async double buffering (Marlin-style), split-K for small grids.
// Measured on an H200 (ncu, 4096 x 4096): the GEMV at m = 1 reads Q4_K in 19 us (~0.5 TB/s), Q4_0
// in 12.5 us, F16 in 42 us; the WMMA GEMM at m = 512 runs at ~37 TFLOP/s (Q4_K). Likely limits, not
// yet profiled: the GEMV's lane-strided 16-bit loads (many L1 wavefronts per byte; repacking fixes
// them) and its 128 registers per thread; the GEMM's unoverlapped tile loads.
#include <mma.h>

#include "cuda/common.cuh"
#include "cuda/ops.h"
#include "cuda/quant_blocks.cuh"
#include "cuda/reduce.cuh"

namespace pe::cuda {

namespace {

// ---- GEMV (m <= 8) ------------------------------------------------------------------------------------

constexpr int kGemvMaxM = 8;
constexpr int kGemvWarps = 8;
constexpr int kGemvThreads = kGemvWarps * 32;
// Two rows per warp: their loads are in flight together and each x value read from shared memory
// serves both. ptxas holds these kernels to 128 registers and at m = 8 they sit at that limit (an
// earlier form of this code spilled 8 bytes on sm_86/89); one row per warp with 16 warps needs far
// fewer but ran 1.8x slower at m = 8 on an H200.
constexpr int kGemvRowsPerWarp = 2;
constexpr int kGemvRowsPerBlock = kGemvWarps * kGemvRowsPerWarp;
// x slices in shared memory: chunk i of row r of the slice at xs[r * slice_stride + i * 36]. The 4
// floats of padding per chunk put the float4 reads of the 8 lanes of a quarter-warp (lanes on
// consecutive chunks) on distinct banks; 144-byte chunk strides keep them 16-byte aligned.
constexpr int kPaddedChunk = kChunk + 4;
constexpr int kGemvSmemFloats = 9216;  // 36 KiB, under the 48 KiB of static shared memory

template <int M>
constexpr int kGemvSliceChunks = kGemvSmemFloats / (M * kPaddedChunk);

// y[r][row] = sum_k x[r][k] * W[row][k] for r < M, rows [blockIdx.x * kGemvRowsPerBlock, +kGemvRowsPerBlock).
template <GGMLType T, int M>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const uint8_t* __restrict__ w, int64_t w_rows,
                                                            int64_t cols, size_t w_stride,
                                                            const float* __restrict__ x, int64_t ldx,
                                                            float* __restrict__ y, int64_t ldy) {
  constexpr int kSliceChunks = kGemvSliceChunks<M>;
  constexpr int kSliceStride = kSliceChunks * kPaddedChunk;  // floats per x row in shared memory
  static_assert(kSliceChunks >= 32, "a slice should give every lane a chunk");
  static_assert(M * kSliceStride <= kGemvSmemFloats, "x slice exceeds shared memory");
  __shared__ __align__(16) float xs[kGemvSmemFloats];

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t row0 = int64_t(blockIdx.x) * kGemvRowsPerBlock + warp * kGemvRowsPerWarp;
  const int64_t n_chunks = (cols + kChunk - 1) / kChunk;

  float acc[kGemvRowsPerWarp][M];
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; i++)
#pragma unroll
    for (int r = 0; r < M; r++) acc[i][r] = 0.0f;

  for (int64_t c0 = 0; c0 < n_chunks; c0 += kSliceChunks) {
    const int nc = int(n_chunks - c0 < kSliceChunks ? n_chunks - c0 : kSliceChunks);
    const int64_t k0 = c0 * kChunk;
    __syncthreads();  // every warp is done with the previous slice
    for (int r = 0; r < M; r++) {
      const float* xr = x + r * ldx;
      for (int k = threadIdx.x; k < nc * kChunk; k += kGemvThreads)
        xs[r * kSliceStride + (k / kChunk) * kPaddedChunk + k % kChunk] = k0 + k < cols ? xr[k0 + k] : 0.0f;
    }
    __syncthreads();

    for (int c = lane; c < nc; c += 32) {
      // Both rows' chunks first, so that their loads are in flight together; a row past the end of W
      // contributes zeros (its warp still takes part in every __syncthreads above).
      float wv[kGemvRowsPerWarp][kChunk];
#pragma unroll
      for (int i = 0; i < kGemvRowsPerWarp; i++) {
        const int64_t row = row0 + i;
        if (row < w_rows) {
          dequantize_chunk<T>(w + row * w_stride, cols, c0 + c, wv[i]);
        } else {
#pragma unroll
          for (int l = 0; l < kChunk; l++) wv[i][l] = 0.0f;
        }
      }
#pragma unroll
      for (int r = 0; r < M; r++) {
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

#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; i++) {
#pragma unroll
    for (int r = 0; r < M; r++) {
      const float s = warp_sum(acc[i][r]);
      const int64_t row = row0 + i;
      if (lane == 0 && row < w_rows) y[r * ldy + row] = s;
    }
  }
}

template <GGMLType T, int M>
void launch_gemv_m(cudaStream_t stream, const Tensor& w, const float* x, int64_t ldx, float* y, int64_t ldy) {
  const int64_t blocks = ceil_div(w.rows, kGemvRowsPerBlock);
  PE_CHECK(blocks <= 0x7fffffff, Error, "matmul: too many weight rows for one grid (", w.rows, ")");
  gemv_kernel<T, M><<<unsigned(blocks), kGemvThreads, 0, stream>>>(static_cast<const uint8_t*>(w.data), w.rows,
                                                                   w.cols, w.row_stride, x, ldx, y, ldy);
  PE_CUDA_LAUNCHED();
}

template <GGMLType T>
void launch_gemv(cudaStream_t stream, const Tensor& w, const float* x, int64_t ldx, int64_t m, float* y,
                 int64_t ldy) {
  switch (m) {
    case 1: return launch_gemv_m<T, 1>(stream, w, x, ldx, y, ldy);
    case 2: return launch_gemv_m<T, 2>(stream, w, x, ldx, y, ldy);
    case 3: return launch_gemv_m<T, 3>(stream, w, x, ldx, y, ldy);
    case 4: return launch_gemv_m<T, 4>(stream, w, x, ldx, y, ldy);
    case 5: return launch_gemv_m<T, 5>(stream, w, x, ldx, y, ldy);
    case 6: return launch_gemv_m<T, 6>(stream, w, x, ldx, y, ldy);
    case 7: return launch_gemv_m<T, 7>(stream, w, x, ldx, y, ldy);
    case 8: return launch_gemv_m<T, 8>(stream, w, x, ldx, y, ldy);
    default: PE_THROW(Error, "matmul: gemv takes 1 to ", kGemvMaxM, " rows of x, got ", m);
  }
}

// ---- tensor-core GEMM (m > 8) ---------------------------------------------------------------------------
//
// Half inputs: x and the dequantised weights are rounded to half (11-bit significand, so about 5e-4
// relative per product) and products are summed in float. Half overflows above 65504: weights never
// get there, but an activation that large (rare outlier channels in some LLMs) would become inf.
// A bf16 or tf32 variant would trade precision for range if that ever matters.

constexpr int kTileM = 64;   // rows of x (and y) per block
constexpr int kTileN = 64;   // rows of W (columns of y) per block
constexpr int kTileK = 64;   // columns per K step: two chunks per W row
constexpr int kGemmThreads = 128;  // four warps, a 2 x 2 grid of 32 x 32 warp tiles
constexpr int kLdh = kTileK + 8;   // half tiles' row stride: a multiple of 8 halves, rows 16 bytes off-bank
constexpr int kLdc = kTileN + 4;   // float output tile's row stride: a multiple of 4 floats
static_assert(kTileN * (kTileK / kChunk) == kGemmThreads, "one W chunk per thread per K step");

template <GGMLType T>
__global__ void __launch_bounds__(kGemmThreads) gemm_wmma_kernel(const uint8_t* __restrict__ w, int64_t w_rows,
                                                                 int64_t cols, size_t w_stride,
                                                                 const float* __restrict__ x, int64_t m, int64_t ldx,
                                                                 float* __restrict__ y, int64_t ldy) {
  using namespace nvcuda;
  // WMMA pointers must be 32-byte aligned: tile rows are 16 apart (16 * kLdh * 2 and 16 * kLdc * 4
  // bytes, multiples of 32) and fragment columns 16 halves / 16 floats apart.
  __shared__ __align__(32) __half xs[kTileM * kLdh];
  __shared__ __align__(32) __half ws[kTileN * kLdh];
  __shared__ __align__(32) float cs[kTileM * kLdc];

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;  // this warp's 32 x 32 part of the 64 x 64 tile
  const int64_t n0 = int64_t(blockIdx.x) * kTileN;
  const int64_t m0 = int64_t(blockIdx.y) * kTileM;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 2; j++) wmma::fill_fragment(acc[i][j], 0.0f);

  // This thread's W chunk in every K step: row w_tile_row of the tile, chunk wc of the step.
  const int w_tile_row = tid / (kTileK / kChunk);
  const int wc = tid % (kTileK / kChunk);
  const int64_t w_row = n0 + w_tile_row;
  const uint8_t* w_row_ptr = w_row < w_rows ? w + w_row * w_stride : nullptr;

  for (int64_t k0 = 0; k0 < cols; k0 += kTileK) {
    for (int i = tid; i < kTileM * kTileK; i += kGemmThreads) {
      const int r = i / kTileK, k = i % kTileK;
      const int64_t gr = m0 + r, gk = k0 + k;
      const float v = gr < m && gk < cols ? x[gr * ldx + gk] : 0.0f;
      xs[r * kLdh + k] = __float2half_rn(v);
    }
    {
      float v[kChunk];
      if (w_row_ptr) {
        dequantize_chunk<T>(w_row_ptr, cols, k0 / kChunk + wc, v);
      } else {
#pragma unroll
        for (int l = 0; l < kChunk; l++) v[l] = 0.0f;
      }
      // Row offset w_tile_row * 144 bytes plus wc * 64 bytes: 4-byte aligned for the half2 stores.
      __half2* dst = reinterpret_cast<__half2*>(ws + w_tile_row * kLdh + wc * kChunk);
#pragma unroll
      for (int l = 0; l < kChunk / 2; l++) dst[l] = __floats2half2_rn(v[2 * l], v[2 * l + 1]);
    }
    __syncthreads();

#pragma unroll
    for (int kk = 0; kk < kTileK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; i++) wmma::load_matrix_sync(a[i], xs + (wm * 32 + i * 16) * kLdh + kk, kLdh);
      // B = W^T (K x N): column n of B is row n of W, stored as ws[n][k], i.e. column-major.
#pragma unroll
      for (int j = 0; j < 2; j++) wmma::load_matrix_sync(b[j], ws + (wn * 32 + j * 16) * kLdh + kk, kLdh);
#pragma unroll
      for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 2; j++) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten by the next step
  }

#pragma unroll
  for (int i = 0; i < 2; i++)
#pragma unroll
    for (int j = 0; j < 2; j++)
      wmma::store_matrix_sync(cs + (wm * 32 + i * 16) * kLdc + wn * 32 + j * 16, acc[i][j], kLdc,
                              wmma::mem_row_major);
  __syncthreads();
  for (int i = tid; i < kTileM * kTileN; i += kGemmThreads) {
    const int r = i / kTileN, n = i % kTileN;
    const int64_t gr = m0 + r, gn = n0 + n;
    if (gr < m && gn < w_rows) y[gr * ldy + gn] = cs[r * kLdc + n];
  }
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

template <GGMLType T>
void launch_gemm(cudaStream_t stream, const Tensor& w, const float* x, int64_t ldx, int64_t m, float* y,
                 int64_t ldy) {
  static_assert(kTileM == kF32Tile && kTileN == kF32Tile, "one grid shape for both GEMMs");
  const int64_t n_tiles = ceil_div(w.rows, kTileN);
  PE_CHECK(n_tiles <= 0x7fffffff, Error, "matmul: too many weight rows for one grid (", w.rows, ")");
  // gridDim.y is at most 65535: rows of x beyond that many tiles go in further launches.
  constexpr int64_t kMaxRowsPerLaunch = int64_t(65535) * kTileM;
  for (int64_t r0 = 0; r0 < m; r0 += kMaxRowsPerLaunch) {
    const int64_t mr = m - r0 < kMaxRowsPerLaunch ? m - r0 : kMaxRowsPerLaunch;
    const dim3 grid(unsigned(n_tiles), unsigned(ceil_div(mr, kTileM)));
    const uint8_t* wp = static_cast<const uint8_t*>(w.data);
    if constexpr (T == GGMLType::F32)
      gemm_f32_kernel<<<grid, kF32Threads, 0, stream>>>(wp, w.rows, w.cols, w.row_stride, x + r0 * ldx, mr, ldx,
                                                        y + r0 * ldy, ldy);
    else
      gemm_wmma_kernel<T><<<grid, kGemmThreads, 0, stream>>>(wp, w.rows, w.cols, w.row_stride, x + r0 * ldx, mr,
                                                             ldx, y + r0 * ldy, ldy);
    PE_CUDA_LAUNCHED();
  }
}

bool aligned(const void* p, size_t a) { return reinterpret_cast<uintptr_t>(p) % a == 0; }

}  // namespace

bool matmul_supports(GGMLType t) { return chunk_type_supported(t); }

void matmul(Executor& ex, const Tensor& w, const Tensor& x, const Tensor& y) {
  PE_CHECK(matmul_supports(w.type), UnsupportedModelError, "matmul: no CUDA kernel for weight type ",
           type_name(uint32_t(w.type)));
  const int64_t m = x.rows;
  if (m == 0 || w.rows == 0) return;
  const size_t wa = size_t(chunk_row_alignment(w.type));
  PE_CHECK(aligned(w.data, wa) && w.row_stride % wa == 0, Error, "matmul: ", type_name(uint32_t(w.type)),
           " weight rows must be ", wa, "-byte aligned on the GPU");
  PE_CHECK(aligned(x.data, 4) && x.row_stride % 4 == 0 && aligned(y.data, 4) && y.row_stride % 4 == 0, Error,
           "matmul: x and y rows must be 4-byte aligned");
  const cudaStream_t stream = stream_of(ex);
  const float* xp = static_cast<const float*>(x.data);
  float* yp = static_cast<float*>(y.data);
  const int64_t ldx = x.ld(), ldy = y.ld();
  visit_chunk_type(w.type, [&](auto type) {
    constexpr GGMLType T = decltype(type)::value;
    if (m <= kGemvMaxM) launch_gemv<T>(stream, w, xp, ldx, m, yp, ldy);
    else launch_gemm<T>(stream, w, xp, ldx, m, yp, ldy);
  });
}

}  // namespace pe::cuda
