// Small vector primitives, dispatched on cpu_path().
#pragma once
#include <cstdint>

#include "ggml_types.h"

namespace pe {

// y[i] = x[i] rounded to F16 (round to nearest even, as F16C does).
void vec_fp32_to_fp16(const float* x, fp16_t* y, int64_t n);

namespace avx2 {
void vec_fp32_to_fp16(const float* x, fp16_t* y, int64_t n);
}  // namespace avx2

}  // namespace pe
