// Matrix multiplication with a (possibly quantized) weight matrix, and row dequantization.
#pragma once
#include <cstdint>

#include "ggml_types.h"
#include "threadpool.h"

namespace pe {

// A weight matrix as stored in GGUF: `rows` rows of `cols` elements of `type`, rows `row_stride`
// bytes apart (row_bytes(type, cols) for a dense tensor). ggml's ne[0] is `cols`, ne[1] is `rows`.
struct WeightView {
  GGMLType type;
  const void* data;
  int64_t rows;
  int64_t cols;
  size_t row_stride;
};

// Y[i][j] = sum_k X[i][k] * W[j][k]  for i < m, j < w.rows, k < w.cols.
// X is m x w.cols float32 with row stride ldx (elements); Y is m x w.rows with row stride ldy.
// Quantized weights: X is quantized on the fly to 8-bit blocks (as ggml: Q8_0 / Q8_1 / Q8_K)
// and dot products run on integers. Work is split over the pool's threads; the kernel family
// follows cpu_path().
void matmul(const WeightView& w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy, ThreadPool& pool);

// The same product for float weights (F32, F16, BF16), on the calling thread only: for callers that
// already split their work over the pool (attention runs one per head).
void matmul_float_serial(const WeightView& w, const float* x, int64_t m, int64_t ldx, float* y, int64_t ldy);

// out[0..w.cols) = row r of W as float32.
void dequantize_row(const WeightView& w, int64_t r, float* out);

// Whether matmul/dequantize_row accept this type.
bool matmul_supports(GGMLType t);

}  // namespace pe
