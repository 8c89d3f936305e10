// AVX2 traits for attention_simd.h (8 floats a vector; tails through a small buffer; F16C conversion).
#include <immintrin.h>

#include <cstring>
#include <utility>

#define PE_ATTN_INLINE inline __attribute__((always_inline))
#include "cpu/attention_simd.h"

namespace pe::cpu {
namespace {

struct Avx2 {
  using F = __m256;
  static constexpr int W = 8;
  static PE_ATTN_INLINE F zero() { return _mm256_setzero_ps(); }
  static PE_ATTN_INLINE F set1(float v) { return _mm256_set1_ps(v); }
  static PE_ATTN_INLINE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static PE_ATTN_INLINE F load_f32(const float* p, int n) {
    if (n == W) return _mm256_loadu_ps(p);
    alignas(32) float b[W] = {};
    std::memcpy(b, p, sizeof(float) * size_t(n));
    return _mm256_load_ps(b);
  }
  static PE_ATTN_INLINE F load_f16(const fp16_t* p, int n) {
    if (n == W) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    alignas(16) fp16_t b[W] = {};
    std::memcpy(b, p, sizeof(fp16_t) * size_t(n));
    return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(b)));
  }
  static PE_ATTN_INLINE void store(float* p, F v, int n) {
    if (n == W) return _mm256_storeu_ps(p, v);
    alignas(32) float b[W];
    _mm256_store_ps(b, v);
    std::memcpy(p, b, sizeof(float) * size_t(n));
  }
};

}  // namespace

const AttentionKernels kAvx2Attention = {scores<Avx2>, values<Avx2>};

}  // namespace pe::cpu
