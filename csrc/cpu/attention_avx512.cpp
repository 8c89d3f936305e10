// AVX-512 traits for attention_simd.h (16 floats a vector, masked tails, F16C conversion).
#include <immintrin.h>

#include <utility>

#define PE_ATTN_INLINE inline __attribute__((always_inline))
#include "cpu/attention_simd.h"

namespace pe::cpu {
namespace {

struct Avx512 {
  using F = __m512;
  static constexpr int W = 16;
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
  static PE_ATTN_INLINE void store(float* p, F v, int n) {
    if (n == W) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, mask(n), v);
  }
};

}  // namespace

const AttentionKernels kAvx512Attention = {scores<Avx512>, values<Avx512>};

}  // namespace pe::cpu
