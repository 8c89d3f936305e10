// Feed-forward activations.
#pragma once
#include "executor.h"
#include "tensor.h"

namespace pe {

enum class Activation {
  SiLU,
  GELU,     // tanh approximation (ggml, GPT-2, ChatGLM-6B)
  GELUErf,  // exact: 0.5 x (1 + erf(x / sqrt 2)) (BERT, HF's "gelu")
  ReLU,     // max(x, 0) (T5 v1.0)
};

// out = act(gate) * up, element-wise; all F32 [n x d]; out may alias gate or up.
void gated_activation(Executor& ex, Activation act, const Tensor& gate, const Tensor& up, const Tensor& out);
// x = act(x) in place (non-gated FFN).
void activation(Executor& ex, Activation act, const Tensor& x);

}  // namespace pe
