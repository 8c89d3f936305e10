// Calibrated quantization with error feedback (GPTQ, Frantar et al. 2022, arXiv:2210.17323), over ggml's
// block quantizers, so the output is standard ggml blocks that llama.cpp reads.
//
// ggml's quantizers (quantize.h), with or without an imatrix, round each block on its own: the error a
// block leaves is lost. The layer's real cost is the error of its output on the calibration inputs X,
// ||(W - Q) X^T||^2 = sum over rows of e H e^T with H = X^T X, and correlated input channels let the
// still-unquantized columns of a row absorb part of an earlier column's error. So each row is quantized
// in column order: at the start of each ggml block, ggml's own (importance-weighted) search picks the
// block's scales and mins on the weights as the earlier columns' feedback left them; then every column
// is rounded to that grid and its error e_j pushed onto the later columns with GPTQ's update
// w_k -= e_j U_jk / U_jj, H^-1 = U^T U (U upper triangular), which minimises e H e^T over the columns not
// yet rounded. The codes are written back into ggml's block (scales untouched) by a packer derived from
// the kernels' unpacker, so the output is ggml's block format for every type.
//
// Each row then keeps whichever of this result and ggml's plain imatrix quantization of the row has the
// lower e H e^T (H undamped), so the output error on the calibration text is never above ggml's.
#pragma once
#include <cstdint>
#include <vector>

#include "ggml_types.h"

namespace pe {
class ThreadPool;
}

namespace pe::cpu {

// h (n x n, row-major) += x^T x over `rows` rows of x (row stride `ld` floats); only the upper triangle
// (j >= i) is written. Splits the rows of h over `pool` when given.
void accumulate_xtx(const float* x, int64_t rows, int64_t ld, int64_t n, float* h, ThreadPool* pool);

// The per-tensor part: from H (n x n; the upper triangle is read) with `damp` * mean(diag H) added to the
// diagonal (GPTQ's dampening: a few calibration rows cannot pin down every direction), the error-feedback
// matrix U (see above; the triangular inverse runs on `pool`); `block` is the type's block size. Throws
// pe::Error if H is not positive definite after damping.
struct FeedbackPlan {
  int64_t n = 0, block = 0;
  std::vector<float> h;                  // H as given, symmetric (n x n): the error measure
  std::vector<float> u;                  // row j: U_jk / U_jj for k > j (n x n, row-major)
};
FeedbackPlan make_feedback_plan(const float* h, int64_t n, int64_t block, double damp, ThreadPool* pool = nullptr);

// e H e^T for one row's error e (H symmetric, n x n).
double weighted_error(const FeedbackPlan& plan, const float* e);

// Quantizes n_rows rows of plan.n floats to type t (any type quantize_rows takes) with error feedback;
// `importance` (plan.n weights, e.g. diag H / rows, or nullptr) is what ggml's quantizer weights each block
// with. Writes n_rows * row_bytes(t, n) bytes to dst. Returns how many rows kept ggml's plain result.
// Single-threaded: callers split rows across threads.
int64_t quantize_rows_feedback(GGMLType t, const FeedbackPlan& plan, const float* src, int64_t n_rows,
                               const float* importance, void* dst);

}  // namespace pe::cpu
