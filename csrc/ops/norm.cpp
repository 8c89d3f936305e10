#include "ops/norm.h"

#include "ops/dispatch.h"

namespace pe {

void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& y, float eps) {
  check_f32(ex, x, x.rows, x.cols, "norm: x");
  check_f32(ex, y, x.rows, x.cols, "norm: y");
  check_f32(ex, w, 1, x.cols, "norm: weight");
  if (!b.empty()) check_f32(ex, b, 1, x.cols, "norm: bias");
  PE_CHECK(type == NormType::Layer || b.empty(), Error, "norm: RMSNorm takes no bias");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, norm, ex, type, x, w, b, y, eps);
}

}  // namespace pe
