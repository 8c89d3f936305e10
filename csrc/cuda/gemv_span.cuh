// Index arithmetic of the decode GEMV (matmul.cu, gemv_kernel) that stages weight bytes in shared
// memory: which bytes a span of chunks covers, and how a warp copies them with the widest loads
// their alignment allows. Host-clean (no CUDA types), so tests/test_cuda_host_quant.py checks it on
// machines without a GPU through bindings_cuda_quant.cpp.
//
// A "span" is up to kSpanChunks consecutive chunks of one weight row, starting at a multiple of
// kSpanChunks: one chunk per lane. For the K-quants 32 chunks are 4 whole super-blocks, so a span
// never cuts a block and the chunk decoders of quant_blocks.cuh can read the staged bytes as if they
// were a row of their own (chunk c of the span is chunk c of that "row").
#pragma once
#include <stdint.h>

#include "cuda/host_device.h"
#include "cuda/quant_blocks.cuh"
#include "ggml_types.h"

namespace pe::cuda {

constexpr int kSpanChunks = 32;  // chunks per span: one per lane

// Elements and bytes of the smallest whole unit of a row of type t: a ggml block, or one chunk of
// a float type (whose rows may end inside it).
PE_HD constexpr int chunk_block_elems(GGMLType t) {
  switch (t) {
    case GGMLType::Q2_K:
    case GGMLType::Q3_K:
    case GGMLType::Q4_K:
    case GGMLType::Q5_K:
    case GGMLType::Q6_K: return 256;
    default: return 32;
  }
}
PE_HD constexpr int chunk_block_bytes(GGMLType t) {
  switch (t) {
    case GGMLType::F32: return 128;
    case GGMLType::F16:
    case GGMLType::BF16: return 64;
    case GGMLType::Q4_0: return 18;
    case GGMLType::Q4_1: return 20;
    case GGMLType::Q5_0: return 22;
    case GGMLType::Q5_1: return 24;
    case GGMLType::Q8_0: return 34;
    case GGMLType::Q2_K: return 84;
    case GGMLType::Q3_K: return 110;
    case GGMLType::Q4_K: return 144;
    case GGMLType::Q5_K: return 176;
    case GGMLType::Q6_K: return 210;
    default: return 0;
  }
}
PE_HD constexpr bool chunk_type_is_float(GGMLType t) {
  return t == GGMLType::F32 || t == GGMLType::F16 || t == GGMLType::BF16;
}

// Bytes of a whole span of type t: the size of a staging buffer.
PE_HD constexpr int span_max_bytes(GGMLType t) {
  return kSpanChunks * kChunk / chunk_block_elems(t) * chunk_block_bytes(t);
}
static_assert(kSpanChunks * kChunk % 256 == 0, "a span must hold whole K-quant super-blocks");

// Byte offset in a row of `cols` elements of type t where chunk c starts (c a multiple of the
// chunks per block); c == the row's chunk count gives the row's length in bytes.
PE_HD int64_t chunk_byte_offset(GGMLType t, int64_t cols, int64_t c) {
  if (chunk_type_is_float(t)) {
    const int64_t k = c * kChunk < cols ? c * kChunk : cols;
    return k * (chunk_block_bytes(t) / kChunk);
  }
  return c / (chunk_block_elems(t) / kChunk) * chunk_block_bytes(t);
}

// The bytes [begin, end) of span s (chunks 32s..32s+31, clipped to the row) of a row.
PE_HD void span_bytes(GGMLType t, int64_t cols, int64_t s, int64_t* begin, int64_t* end) {
  const int64_t n_chunks = (cols + kChunk - 1) / kChunk;
  const int64_t c0 = s * kSpanChunks;
  const int64_t c1 = c0 + kSpanChunks < n_chunks ? c0 + kSpanChunks : n_chunks;
  *begin = chunk_byte_offset(t, cols, c0);
  *end = chunk_byte_offset(t, cols, c1);
}

// The length of the row from span s on: what a chunk decoder reading the staged span as a row
// needs as `cols` so that a float row's partial last chunk is cut where the row ends.
PE_HD int64_t span_cols(int64_t cols, int64_t s) { return cols - s * (kSpanChunks * kChunk); }

// How a warp copies n bytes (n even) from a global address whose low four bits are `mis` (even)
// into a shared buffer at the same offset mod 16, so that 16-byte global loads land 16-byte aligned
// in shared memory too. The bytes split into a head up to the first 16-byte boundary, a body of
// 16-byte pieces (lanes take them in turn: one coalesced 512-byte load per warp-wide step) and a
// tail after the last boundary; head and tail (under 16 bytes each) go in at most three pieces of
// 8, 4 or 2 bytes, each aligned to its size.
struct SpanCopy {
  int head;  // bytes before the first 16-byte boundary (all n if the span ends before it)
  int body;  // 16-byte pieces
  int tail;  // bytes after the body
};

PE_HD SpanCopy span_copy_plan(int mis, int n) {
  int head = (16 - mis) & 15;
  if (head > n) head = n;
  const int body = (n - head) / 16;
  return SpanCopy{head, body, n - head - 16 * body};
}

// The size of the piece at relative offset `off` of a head or tail: the largest of 8, 4, 2 that the
// address (low bits mis + off) is aligned to and that does not pass `left` bytes.
PE_HD int span_piece_size(int mis, int off, int left) {
  const int a = (mis + off) & 15;
  int s = 8;
  while (s > 2 && ((a & (s - 1)) != 0 || s > left)) s >>= 1;
  return s;
}

// The pieces lane `lane` of a warp copies: f(offset, size) for each, offsets relative to the span's
// start. The 16-byte pieces of the body go to the lanes in turn; lane 0 copies the head and lane 1
// the tail. Over the 32 lanes the pieces cover the n bytes exactly once, each aligned to its size.
template <typename F>
PE_HD void for_each_span_piece(int mis, int n, int lane, F&& f) {
  const SpanCopy plan = span_copy_plan(mis, n);
  for (int k = lane; k < plan.body; k += 32) f(plan.head + 16 * k, 16);
  if (lane < 2) {
    int off = lane == 0 ? 0 : plan.head + 16 * plan.body;
    int left = lane == 0 ? plan.head : plan.tail;
    while (left > 0) {
      const int s = span_piece_size(mis, off, left);
      f(off, s);
      off += s;
      left -= s;
    }
  }
}

}  // namespace pe::cuda
