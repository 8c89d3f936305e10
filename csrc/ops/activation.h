// Feed-forward activations and element-wise helpers.
#pragma once
#include <cstdint>

#include "threadpool.h"

namespace pe {

enum class Activation { SiLU, GELU };

// out[i] = act(gate[i]) * up[i]  for n rows of d; rows `stride` floats apart in all three.
void gated_activation(Activation act, const float* gate, const float* up, float* out, int64_t n, int64_t d,
                      int64_t stride, ThreadPool& pool);
// x[i] = act(x[i]) in place (non-gated FFN).
void activation_inplace(Activation act, float* x, int64_t n, int64_t d, int64_t stride, ThreadPool& pool);
// y[r][i] += b[i] for n rows of d, rows `stride` apart.
void add_bias(float* y, const float* b, int64_t n, int64_t d, int64_t stride);

}  // namespace pe
