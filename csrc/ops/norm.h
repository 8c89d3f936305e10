// Row normalisation over n rows of d floats (rows contiguous).
#pragma once
#include <cstdint>

#include "threadpool.h"

namespace pe {

// y = x / sqrt(mean(x^2) + eps) * w
void rms_norm(const float* x, const float* w, float* y, int64_t n, int64_t d, float eps, ThreadPool& pool);
// y = (x - mean) / sqrt(var + eps) * w + b   (b may be null)
void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, int64_t d, float eps,
                ThreadPool& pool);

}  // namespace pe
