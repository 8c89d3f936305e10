// Float rows -> ggml blocks: the quantizers behind `pyengine convert` and `pyengine quantize`.
//
// Every type's output is byte-for-byte what ggml's `quantize_<type>` (ggml-quants.c) writes for the
// same rows and importance weights, so files interchange with llama.cpp and the quality of each type
// is llama-quantize's (tests/test_quantize.py compiles ggml-quants.c from the llama.cpp sources and
// compares bytes). Without importance weights, each type is ggml's `quantize_row_<type>_ref`; with
// them (an imatrix: per-column mean squared activations), the weighted `quantize_row_<type>_impl`.
#pragma once
#include <cstddef>
#include <cstdint>

#include "ggml_types.h"

namespace pe::cpu {

// Whether quantize_rows handles `t`: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K.
bool can_quantize(GGMLType t);

// Quantizes `n_rows` rows of `n_per_row` floats (n_per_row a multiple of the type's block size) into
// `dst` (n_rows * row_bytes(t, n_per_row) bytes). `importance` is nullptr or n_per_row weights, one per
// column, shared by every row. Single-threaded: callers split rows across threads.
void quantize_rows(GGMLType t, const float* src, int64_t n_rows, int64_t n_per_row, const float* importance,
                   void* dst);

// One Q8_0 block: x[0..32) as ggml's quantize_row_q8_0_ref rounds it (d = max |x| / 127, q = round(x / d),
// half away from zero, d kept as fp16), the 32 values `q_stride` bytes apart (the KV cache stores keys
// transposed). Defined where ggml's is not: a denormal d (1 / d overflows) divides instead, and a block
// holding an infinite or NaN value gets a NaN scale and zeros, so a reader computes NaN, never garbage.
void quantize_block_q8_0(const float* x, int8_t* q, int64_t q_stride, fp16_t* d);

}  // namespace pe::cpu
