// The draw at the end of sampling a token (pyengine/sampling.py decides which tokens are candidates).
#pragma once
#include <cstdint>

namespace pe::cpu {

// The index drawn from softmax(x * inv_t) over x[0, n) at u in [0, 1), by inverse CDF in index order:
// weights e^((x_i - max x) inv_t) in float32 (0 where that is below -87.3, so -inf is never drawn),
// summed per 1024 elements in float32 and across blocks in double. -1 when x holds a NaN or no finite
// maximum (every element -inf, or +inf). inv_t > 0 and finite.
int64_t softmax_draw(const float* x, int64_t n, float inv_t, double u);

}  // namespace pe::cpu
