// AVX2 traits for attention_simd.h (8 floats a vector; tails through a small buffer; F16C conversion;
// int8 widening).
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
  static constexpr int kRegs = 16;  // vector registers
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
  static PE_ATTN_INLINE F load_i8(const int8_t* p, int n) {
    int64_t b = 0;  // 8 bytes: a full vector, or the tail zero-padded
    std::memcpy(&b, p, size_t(n));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(b)));
  }
  static PE_ATTN_INLINE F set1_f16(fp16_t h) { return _mm256_set1_ps(_cvtsh_ss(h)); }
  static PE_ATTN_INLINE void store(float* p, F v, int n) {
    if (n == W) return _mm256_storeu_ps(p, v);
    alignas(32) float b[W];
    _mm256_store_ps(b, v);
    std::memcpy(p, b, sizeof(float) * size_t(n));
  }
  static PE_ATTN_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static PE_ATTN_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static PE_ATTN_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static PE_ATTN_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
  static PE_ATTN_INLINE F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  // a * 2^n for integral n in [-126, 127]: n added to the exponent field
  static PE_ATTN_INLINE F scale2(F a, F n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
  }
  static PE_ATTN_INLINE float hsum(F a) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  static PE_ATTN_INLINE float hmax(F a) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
};

}  // namespace

const AttentionKernels kAvx2Attention = {scores<Avx2>, values<Avx2>, softmax<Avx2>};

}  // namespace pe::cpu
