// Element-wise and row-selection ops of the forward pass: residual adds, biases, scaling, and rows
// picked by index (the embedding lookup, the rows whose logits are wanted).
#pragma once
#include "executor.h"
#include "tensor.h"

namespace pe {

// x += y; both F32 [n x d].
void add(Executor& ex, const Tensor& x, const Tensor& y);
// y[r] += b for every row r; y F32 [n x d], b F32 [1 x d].
void add_bias(Executor& ex, const Tensor& y, const Tensor& b);
// y = x * alpha; F32 [n x d].
void scale(Executor& ex, const Tensor& x, float alpha, const Tensor& y);
// x = cap * tanh(x / cap) in place (Gemma 2's final logit soft-capping); cap > 0.
void softcap(Executor& ex, const Tensor& x, float cap);
// out[i] = row ids[i] of `table` as F32 (table of any matmul type: the token embedding; or F32
// activations). ids: I32 [1 x n], each checked against table.rows; out F32 [n x table.cols].
void get_rows(Executor& ex, const Tensor& table, const Tensor& ids, const Tensor& out);

}  // namespace pe
