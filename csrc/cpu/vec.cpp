#include "cpu/vec.h"

#include "cpu_features.h"

namespace pe {

// The AVX-512 path uses the AVX2 versions: these loops are short (head_dim) and memory-bound.
#if defined(PE_X86)
#define PE_VEC_SIMD (cpu_path() != CpuPath::Portable)
#else
#define PE_VEC_SIMD false
#endif

float vec_dot_f16_f32(const fp16_t* x, const float* y, int64_t n) {
#if defined(PE_X86)
  if (PE_VEC_SIMD) return avx2::vec_dot_f16_f32(x, y, n);
#endif
  float s = 0;
  for (int64_t i = 0; i < n; i++) s += fp16_to_fp32(x[i]) * y[i];
  return s;
}

void vec_axpy_f16(float* y, const fp16_t* x, float a, int64_t n) {
#if defined(PE_X86)
  if (PE_VEC_SIMD) return avx2::vec_axpy_f16(y, x, a, n);
#endif
  for (int64_t i = 0; i < n; i++) y[i] += a * fp16_to_fp32(x[i]);
}

void vec_fp32_to_fp16(const float* x, fp16_t* y, int64_t n) {
#if defined(PE_X86)
  if (PE_VEC_SIMD) return avx2::vec_fp32_to_fp16(x, y, n);
#endif
  for (int64_t i = 0; i < n; i++) y[i] = fp32_to_fp16(x[i]);
}

void vec_fp16_to_fp32(const fp16_t* x, float* y, int64_t n) {
#if defined(PE_X86)
  if (PE_VEC_SIMD) return avx2::vec_fp16_to_fp32(x, y, n);
#endif
  for (int64_t i = 0; i < n; i++) y[i] = fp16_to_fp32(x[i]);
}

float vec_dot_f32(const float* x, const float* y, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; i++) s += x[i] * y[i];
  return s;
}

void vec_axpy_f32(float* y, const float* x, float a, int64_t n) {
  for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

}  // namespace pe
