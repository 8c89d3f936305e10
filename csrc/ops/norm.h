// Row normalisation.
#pragma once
#include "executor.h"
#include "tensor.h"

namespace pe {

enum class NormType { RMS, Layer };

// y = x / sqrt(mean(x^2) + eps) * w            (RMS)
// y = (x - mean) / sqrt(var + eps) * w + b     (Layer; b may be empty)
// x, y: F32 [n x d] (may be the same tensor); w, b: F32 [1 x d].
void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y, float eps);

// x += residual, then y = norm(x): a block's residual add and the next pre-norm in one pass over the
// row (one kernel on a GPU instead of two). residual F32 [n x d] may be y; the sums are those of
// add() followed by norm(), so the results are the same bit for bit.
void add_norm(Executor& ex, NormType type, const Tensor& x, const Tensor& residual, const Tensor& w, const Tensor& b,
              const Tensor& y, float eps);

// RMSNorm of every head of every row, in place: x F32 [n x n_heads * head_dim] (a column view of a
// fused QKV is fine), w F32 [1 x head_dim] shared by the heads (Qwen3's and Gemma 3's q/k norms).
void norm_heads(Executor& ex, const Tensor& x, int n_heads, const Tensor& w, float eps);

}  // namespace pe
