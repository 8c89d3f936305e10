// Small vector primitives for the attention and conversion loops, dispatched on cpu_path().
#pragma once
#include <cstdint>

#include "ggml_types.h"

namespace pe {

float vec_dot_f16_f32(const fp16_t* x, const float* y, int64_t n);        // sum x[i] * y[i]
void vec_axpy_f16(float* y, const fp16_t* x, float a, int64_t n);         // y[i] += a * x[i]
void vec_fp32_to_fp16(const float* x, fp16_t* y, int64_t n);
void vec_fp16_to_fp32(const fp16_t* x, float* y, int64_t n);
// F32 versions: plain loops the compiler vectorises.
float vec_dot_f32(const float* x, const float* y, int64_t n);
void vec_axpy_f32(float* y, const float* x, float a, int64_t n);

namespace avx2 {
float vec_dot_f16_f32(const fp16_t* x, const float* y, int64_t n);
void vec_axpy_f16(float* y, const fp16_t* x, float a, int64_t n);
void vec_fp32_to_fp16(const float* x, fp16_t* y, int64_t n);
void vec_fp16_to_fp32(const fp16_t* x, float* y, int64_t n);
}  // namespace avx2

}  // namespace pe
