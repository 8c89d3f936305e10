#include "ops/norm.h"

#include "ops/dispatch.h"

namespace pe {

namespace {

void check_norm(Executor& ex, NormType type, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y) {
  check_f32(ex, x, x.rows, x.cols, "norm: x");
  check_f32(ex, y, x.rows, x.cols, "norm: y");
  check_f32(ex, w, 1, x.cols, "norm: weight");
  if (!b.empty()) check_f32(ex, b, 1, x.cols, "norm: bias");
  PE_CHECK(type == NormType::Layer || b.empty(), Error, "norm: RMSNorm takes no bias");
}

}  // namespace

void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y, float eps) {
  check_norm(ex, type, x, w, b, y);
  if (x.rows == 0) return;
  PE_DISPATCH(ex, norm, ex, type, x, Tensor{}, w, b, y, eps);
}

void add_norm(Executor& ex, NormType type, const Tensor& x, const Tensor& residual, const Tensor& w, const Tensor& b,
              const Tensor& y, float eps) {
  check_norm(ex, type, x, w, b, y);
  check_f32(ex, residual, x.rows, x.cols, "add_norm: residual");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, norm, ex, type, x, residual, w, b, y, eps);
}

void norm_heads(Executor& ex, const Tensor& x, int n_heads, const Tensor& w, float eps) {
  PE_CHECK(n_heads > 0 && x.cols % n_heads == 0, Error, "norm_heads: ", x.cols, " columns are not ", n_heads, " heads");
  check_f32(ex, x, x.rows, x.cols, "norm_heads: x");
  check_f32(ex, w, 1, x.cols / n_heads, "norm_heads: weight");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, norm_heads, ex, x, n_heads, w, eps);
}

}  // namespace pe
