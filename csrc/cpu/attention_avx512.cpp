// AVX-512 traits for attention_simd.h (16 floats a vector, masked tails, F16C conversion, int8 widening).
#include <immintrin.h>

#include <utility>

#define PE_ATTN_INLINE inline __attribute__((always_inline))
#include "cpu/attention_simd.h"

namespace pe::cpu {
namespace {

struct Avx512 {
  using F = __m512;
  static constexpr int W = 16;
  static constexpr int kRegs = 32;  // vector registers
  static PE_ATTN_INLINE __mmask16 mask(int n) { return __mmask16((1u << n) - 1); }
  static PE_ATTN_INLINE F zero() { return _mm512_setzero_ps(); }
  static PE_ATTN_INLINE F set1(float v) { return _mm512_set1_ps(v); }
  static PE_ATTN_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static PE_ATTN_INLINE F load_f32(const float* p, int n) {
    return n == W ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(mask(n), p);
  }
  static PE_ATTN_INLINE F load_f16(const fp16_t* p, int n) {
    const __m256i h = n == W ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                             : _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_cvtph_ps(h);
  }
  static PE_ATTN_INLINE F load_i8(const int8_t* p, int n) {
    const __m128i b = n == W ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(mask(n), p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  static PE_ATTN_INLINE F set1_f16(fp16_t h) { return _mm512_set1_ps(_cvtsh_ss(h)); }
  static PE_ATTN_INLINE void store(float* p, F v, int n) {
    if (n == W) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, mask(n), v);
  }
  static PE_ATTN_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static PE_ATTN_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static PE_ATTN_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static PE_ATTN_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
  static PE_ATTN_INLINE F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static PE_ATTN_INLINE F scale2(F a, F n) { return _mm512_scalef_ps(a, n); }
  static PE_ATTN_INLINE float hsum(F a) { return _mm512_reduce_add_ps(a); }
  static PE_ATTN_INLINE float hmax(F a) { return _mm512_reduce_max_ps(a); }
};

}  // namespace

const AttentionKernels kAvx512Attention = {scores<Avx512>, values<Avx512>, softmax<Avx512>};

}  // namespace pe::cpu
