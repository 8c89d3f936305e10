#include "ops/activation.h"

#include "ops/dispatch.h"

namespace pe {

void gated_activation(Executor& ex, Activation act, const Tensor& gate, const Tensor& up, const Tensor& out) {
  check_f32(ex, gate, gate.rows, gate.cols, "gated_activation: gate");
  check_f32(ex, up, gate.rows, gate.cols, "gated_activation: up");
  check_f32(ex, out, gate.rows, gate.cols, "gated_activation: out");
  if (gate.rows == 0) return;
  PE_DISPATCH(ex, gated_activation, ex, act, gate, up, out);
}

void activation(Executor& ex, Activation act, const Tensor& x) {
  check_f32(ex, x, x.rows, x.cols, "activation: x");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, activation, ex, act, x);
}

}  // namespace pe
