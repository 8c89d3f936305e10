// How the tensor-core GEMM (matmul.cu, m > 8 rows of x: prefill) cuts its work, and where each lane's
// operands of mma.sync.m16n8k16 lie: the index arithmetic of gemm_mma_kernel, shared with its host
// mirror (bindings_cuda_quant.cpp: cuda_host_gemm runs the kernel's blocks, warps and lanes on the
// CPU, so tests/test_cuda_host_quant.py checks the staging, the fragment loads and the epilogue on a
// machine without a GPU). Compiled by nvcc and by the host compiler: no CUDA types here.
//
// A block computes a kGemmM x kGemmN tile of y = x W^T in K steps of kGemmK columns. Each step's x
// tile (half, from a padded half copy of x that the kernel before it writes) and W tile (each of its
// chunks dequantised by one thread with cuda/quant_blocks.cuh and rounded to half) sit in shared
// memory as rows of kGemmLd halves, x rows first; two such stages alternate, so one step's tiles are
// filled while the warps multiply the other's. The 8 warps form a 2 x 4 grid of 64 x 32 parts of
// the tile; a warp's part is 4 x 4 mma.sync.m16n8k16 (f16 inputs, f32 accumulators) per 16
// columns.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"; lane = 4 g + t):
//   A (16 x 16, row-major), 4 registers of 2 halves: register r holds (row, k) and (row, k + 1),
//     row = g + 8 (r % 2), k = 2 t + 8 (r / 2);
//   B (16 x 8: k x n, read from W's rows, i.e. "col"), 2 registers: register r holds (k, n) and
//     (k + 1, n), n = g, k = 2 t + 8 r;
//   C / D (16 x 8 floats), 4 registers: element e at row g + 8 (e / 2), column 2 t + e % 2.
// A fragment register is one 32-bit shared-memory load: the pair is adjacent in a tile row.
#pragma once
#include <stdint.h>

#include "cuda/host_device.h"

namespace pe::cuda {

constexpr int kGemvMaxRows = 8;   // matmuls of up to this many rows of x take the GEMV instead
constexpr int kGemmM = 128;        // rows of x (and of y) per block
constexpr int kGemmN = 128;        // rows of W (columns of y) per block
constexpr int kGemmK = 64;         // columns per K step: two 32-element chunks of each W row
constexpr int kGemmThreads = 256;  // 8 warps
constexpr int kGemmWarpsN = 4;     // warps across W's rows; 2 across x's
constexpr int kGemmWarpM = 64;     // a warp's rows of x
constexpr int kGemmWarpN = 32;     // a warp's rows of W
constexpr int kGemmFragsM = kGemmWarpM / 16;  // mma tiles per warp, down
constexpr int kGemmFragsN = kGemmWarpN / 8;   // and across
// Halves per tile row in shared memory: 72 = 36 words, so the 8 rows x 4 words of a fragment load
// fall in 32 different banks (36 g + t mod 32 = 4 g + t), and rows stay 16-byte aligned (144 bytes)
// for the 16-byte copies that fill them.
constexpr int kGemmLd = kGemmK + 8;
constexpr int kGemmStageHalves = (kGemmM + kGemmN) * kGemmLd;  // x tile, then W tile
constexpr int kGemmSmemBytes = 2 * kGemmStageHalves * 2;       // two stages: 73,728 bytes
// Each step's x tile is kGemmM rows of kGemmK halves, copied in 16-byte pieces (8 halves).
constexpr int kGemmXPieces = kGemmM * kGemmK / 8 / kGemmThreads;  // per thread: 4
static_assert(kGemmN * (kGemmK / 32) == kGemmThreads, "one W chunk per thread per K step");
static_assert((kGemmWarpsN * kGemmWarpN == kGemmN) && (kGemmThreads / 32 / kGemmWarpsN * kGemmWarpM == kGemmM),
              "the warps cover the tile");

// The half copy of x that the kernel reads: rows padded to whole blocks and columns to whole K
// steps, with zeros, so every piece a block copies exists and the padding adds nothing.
PE_HD int64_t gemm_x_rows(int64_t m) { return (m + kGemmM - 1) / kGemmM * kGemmM; }
PE_HD int64_t gemm_x_cols(int64_t cols) { return (cols + kGemmK - 1) / kGemmK * kGemmK; }
PE_HD int64_t gemm_steps(int64_t cols) { return gemm_x_cols(cols) / kGemmK; }

// Split-K: a grid of fewer tiles than the GPU has SMs (short prompts: up to 128 rows of x, a 4096-row
// W is 32 tiles) cuts each tile's K steps into `splits` consecutive ranges, one block each, whose
// partial sums a second kernel adds in split order (the same bits every run). At least 4 steps a
// split, at most 8 splits, and at most kGemmMaxSplitTiles tiles' partials (16 MiB of floats).
constexpr int kGemmMaxSplitTiles = 256;
PE_HD int gemm_splits(int64_t tiles, int64_t steps, int sms) {
  if (tiles >= sms) return 1;
  int64_t s = (sms + tiles - 1) / tiles;
  if (s > 8) s = 8;
  if (s > steps / 4) s = steps / 4;
  if (s * tiles > kGemmMaxSplitTiles) s = kGemmMaxSplitTiles / tiles;
  return s < 1 ? 1 : int(s);
}
PE_HD int64_t gemm_split_steps(int64_t steps, int splits) { return (steps + splits - 1) / splits; }
// The K steps of split z: [z split_steps, + this many) of all_steps (the last splits may have none).
PE_HD int64_t gemm_split_count(int64_t all_steps, int64_t split_steps, int z) {
  const int64_t left = all_steps - z * split_steps;
  return left <= 0 ? 0 : left < split_steps ? left : split_steps;
}

// Piece i (< kGemmXPieces) of thread tid's share of a step's x tile: row and first column in the tile.
PE_HD void gemm_x_piece(int tid, int i, int& row, int& col) {
  const int p = tid + i * kGemmThreads;  // consecutive threads, consecutive 16 bytes: coalesced
  row = p / (kGemmK / 8);
  col = p % (kGemmK / 8) * 8;
}

// The W chunk thread tid dequantises each step: row of the tile, and which of the step's two chunks.
PE_HD void gemm_w_chunk(int tid, int& row, int& chunk) {
  row = tid / 2;
  chunk = tid % 2;
}

// The first row of x and of W of warp `warp`'s part of the tile.
PE_HD void gemm_warp_origin(int warp, int& row_x, int& row_w) {
  row_x = warp / kGemmWarpsN * kGemmWarpM;
  row_w = warp % kGemmWarpsN * kGemmWarpN;
}

// Fragment coordinates (see the top of this file) within one m16n8k16 operation.
PE_HD int frag_a_row(int lane, int r) { return lane / 4 + 8 * (r % 2); }
PE_HD int frag_a_k(int lane, int r) { return 2 * (lane % 4) + 8 * (r / 2); }
PE_HD int frag_b_n(int lane) { return lane / 4; }
PE_HD int frag_b_k(int lane, int r) { return 2 * (lane % 4) + 8 * r; }
PE_HD int frag_c_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
PE_HD int frag_c_col(int lane, int e) { return 2 * (lane % 4) + e % 2; }

// Offsets, in halves from the start of a stage, of A register r of mma row-tile i and of B register
// r of mma column-tile j, for sub-step kk (0, 16, 32, 48) of a warp whose part starts at (row_x, row_w).
PE_HD int gemm_a_offset(int row_x, int i, int kk, int lane, int r) {
  return (row_x + 16 * i + frag_a_row(lane, r)) * kGemmLd + kk + frag_a_k(lane, r);
}
PE_HD int gemm_b_offset(int row_w, int j, int kk, int lane, int r) {
  return (kGemmM + row_w + 8 * j + frag_b_n(lane)) * kGemmLd + kk + frag_b_k(lane, r);
}

}  // namespace pe::cuda
