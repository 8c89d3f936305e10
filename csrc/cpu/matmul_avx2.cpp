// AVX2 matmul kernels (AVX2, FMA, F16C): the vector traits for matmul_simd.h, which holds the kernels.
// Compiled with those ISA flags; called only when cpu_path() is AVX2 (or from nowhere on CPUs without
// it). Float weights are in matmul_float_avx2.cpp.
//
// 8-row panels: one ymm holds 4 consecutive u bytes of each of 8 weight rows. Without VNNI the byte
// products go through pmaddubsw (u8 x s8 -> pairs summed to s16, saturating) and pmaddwd: partial sums
// stay in int16 for as many groups as the type's largest u allows without overflow, so small-u types pay
// one pmaddwd per sub-block. Q8_0 (u up to 255 would saturate) keeps signed weights and uses the sign
// trick, which needs activations != -128 (guaranteed by quantize_x).
#include <immintrin.h>

#include <cstring>

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu/matmul_kernels.h"
#include "cpu/unpack_simd.h"

namespace pe::cpu {
namespace {

struct Avx2 {
  using I = __m256i;
  using F = __m256;
  static constexpr int kRows = 8;            // weight rows per panel: one int32 lane each
  static constexpr bool kVnni = false;       // integer dot step: pmaddubsw + pmaddwd
  static constexpr int kMaxSmallM = 3;       // up to this many activation rows, decode kernels
  // ... and in passes of kMaxSmallM up to this many times that: packing the panels (a quarter of an
  // 8-sequence step) cost more than unpacking the weights once a pass. SmolLM2 Q4_0 on this path, Zen 4,
  // 2 threads, medians of 8-24 alternations in one process, step ms packed / passes: 8 rows 15.1 /
  // 13.5, 12 rows 18.4 / 16.0, 16 rows 22.6 / 21.1, 24 rows 32.6 / 31.9, 32 rows 41.4 / 40.4.
  static constexpr int kSmallPasses = 6;
  static constexpr int kTileM = 4;           // activation rows per prefill register tile ...
  static constexpr int kPrefillPanels = 1;   // ... times this many panels
  // Decode: two panels per loop for the 32-element types; a K-quant block's state (16 scales, 16 mins)
  // already overflows the 16 ymm registers, and a second panel only added spills (15-25% slower). Only
  // where DecodeTuning asks for two (not on AMD CPUs).
  template <class P>
  static constexpr int decode_panels() { return P::kSubsPerUnit == 1 ? 2 : 1; }

  // Integer ops.
  static PE_INLINE I zero_i() { return _mm256_setzero_si256(); }
  static PE_INLINE I set1_i8(int v) { return _mm256_set1_epi8(char(v)); }
  static PE_INLINE I set1_i16(int v) { return _mm256_set1_epi16(short(v)); }
  static PE_INLINE I set1_i32(int v) { return _mm256_set1_epi32(v); }
  static PE_INLINE I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static PE_INLINE I or_(I a, I b) { return _mm256_or_si256(a, b); }
  static PE_INLINE I xor_(I a, I b) { return _mm256_xor_si256(a, b); }
  static PE_INLINE I add_i16(I a, I b) { return _mm256_add_epi16(a, b); }
  static PE_INLINE I add_i32(I a, I b) { return _mm256_add_epi32(a, b); }
  static PE_INLINE I sub_i32(I a, I b) { return _mm256_sub_epi32(a, b); }
  static PE_INLINE I srli_i16(I v, int n) { return _mm256_srli_epi16(v, n); }
  static PE_INLINE I srli_i32(I v, int n) { return _mm256_srli_epi32(v, n); }
  static PE_INLINE I slli_i32(I v, int n) { return _mm256_slli_epi32(v, n); }
  static PE_INLINE I srai_i32(I v, int n) { return _mm256_srai_epi32(v, n); }
  static PE_INLINE I sign_i8(I a, I b) { return _mm256_sign_epi8(a, b); }
  static PE_INLINE I maddubs(I u, I x) { return _mm256_maddubs_epi16(u, x); }
  static PE_INLINE I madd_i16(I a, I b) { return _mm256_madd_epi16(a, b); }
  static PE_INLINE I load_i(const void* p) { return _mm256_load_si256(static_cast<const __m256i*>(p)); }
  static PE_INLINE I loadu_i(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
  static PE_INLINE void store_i(void* p, I v) { _mm256_store_si256(static_cast<__m256i*>(p), v); }
  // The lane sums of a and of b, through one reduction tree.
  static PE_INLINE void hsum2_i32(I a, I b, int& sa, int& sb) {
    I s = _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0x4E));
    s = _mm256_add_epi32(s, _mm256_shuffle_epi32(s, 0xB1));  // a's sum in lane 0, b's in lane 4
    sa = _mm_cvtsi128_si32(_mm256_castsi256_si128(s));
    sb = _mm_cvtsi128_si32(_mm256_extracti128_si256(s, 1));
  }
  // |v|'s bits: for floats of one sign, integer order is float order, and >= 0x7f800000 is NaN or Inf.
  static PE_INLINE I abs_bits(F v) { return _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)); }
  static PE_INLINE I max_u32(I a, I b) { return _mm256_max_epu32(a, b); }
  static PE_INLINE uint32_t hmax_u32(I v) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return uint32_t(_mm_cvtsi128_si32(m));
  }

  // Float ops.
  static PE_INLINE F zero_ps() { return _mm256_setzero_ps(); }
  static PE_INLINE F set1_ps(float v) { return _mm256_set1_ps(v); }
  static PE_INLINE F cvt(I v) { return _mm256_cvtepi32_ps(v); }
  static PE_INLINE I cvt_i32(F v) { return _mm256_cvtps_epi32(v); }
  static PE_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static PE_INLINE F neg(F v) { return _mm256_sub_ps(_mm256_setzero_ps(), v); }
  static PE_INLINE F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static PE_INLINE F load_ps(const void* p) { return _mm256_load_ps(static_cast<const float*>(p)); }
  // 8 fp16 side by side (a packed panel's scales) as floats.
  static PE_INLINE F cvt_f16(const void* p) { return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p))); }
  static PE_INLINE F loadu_ps(const float* p) { return _mm256_loadu_ps(p); }
  static PE_INLINE void store_ps(void* p, F v) { _mm256_store_ps(static_cast<float*>(p), v); }
  static PE_INLINE void storeu_ps(float* p, F v) { _mm256_storeu_ps(p, v); }
  static PE_INLINE void store_rows(float* p, F v, int64_t n) {
    alignas(32) float tmp[kRows];
    _mm256_store_ps(tmp, v);
    std::memcpy(p, tmp, size_t(n) * sizeof(float));
  }

  // 32 int32 (|q| <= 127) to 32 int8 in order (packs interleave 128-bit lanes; the permute undoes it).
  static PE_INLINE void store_q8(int8_t* dst, const I q[4]) {
    const I p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
    const I p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), p8);
  }

  // Unpacking.

  // t[g] (g < 4): int32 lane i = bytes 4g..4g+3 of the 16 bytes at row i + off (rows 4j+k in lane j of
  // register k, so that the in-lane 4x4 transpose leaves them in order).
  static PE_INLINE void load_transpose(const PanelRows& r, int64_t off, I t[4]) {
    for (int k = 0; k < 4; k++)
      t[k] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(r.at(4 + k, off)),
                                 reinterpret_cast<const __m128i*>(r.at(k, off)));
    const I a0 = _mm256_unpacklo_epi32(t[0], t[1]), a1 = _mm256_unpackhi_epi32(t[0], t[1]);
    const I a2 = _mm256_unpacklo_epi32(t[2], t[3]), a3 = _mm256_unpackhi_epi32(t[2], t[3]);
    t[0] = _mm256_unpacklo_epi64(a0, a2);
    t[1] = _mm256_unpackhi_epi64(a0, a2);
    t[2] = _mm256_unpacklo_epi64(a1, a3);
    t[3] = _mm256_unpackhi_epi64(a1, a3);
  }

  // The fp16 at row i + off, for the 8 rows, as floats.
  static PE_INLINE F load_f16(const PanelRows& r, int64_t off) {
    uint64_t q[2];
    for (int j = 0; j < 2; j++)
      q[j] = load_u16(r.at(4 * j, off)) | load_u16(r.at(4 * j + 1, off)) << 16 |
             load_u16(r.at(4 * j + 2, off)) << 32 | load_u16(r.at(4 * j + 3, off)) << 48;
    return _mm256_cvtph_ps(_mm_set_epi64x(int64_t(q[1]), int64_t(q[0])));
  }

  static PE_INLINE I load_u32(const PanelRows& r, int64_t off) {
    int32_t h[8];
    for (int i = 0; i < 8; i++) std::memcpy(&h[i], r.at(i, off), 4);
    return _mm256_setr_epi32(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
  }

  // Adds 16 to the bytes of group g (elements 4g..4g+3) whose bit in the 32-bit qh of their row is set.
  static PE_INLINE I add_q5_high_bits(I u, I qh, int g) {
    const I idx = _mm256_add_epi8(_mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404,
                                                    0x08080808, 0x0C0C0C0C),
                                  _mm256_set1_epi8(char(g / 2)));
    const I bits = _mm256_set1_epi32((g & 1) ? int32_t(0x80402010) : 0x08040201);
    const I sel = _mm256_and_si256(_mm256_shuffle_epi8(qh, idx), bits);
    const I set = _mm256_cmpeq_epi8(sel, bits);  // 0xFF where the bit is set
    return _mm256_add_epi8(u, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
  }

  // (v >> shift) & mask in every byte (32-bit shifts; the mask drops what crosses byte boundaries).
  static PE_INLINE I bits(I v, int shift, int mask) {
    const I s = shift >= 0 ? _mm256_srli_epi32(v, shift) : _mm256_slli_epi32(v, -shift);
    return _mm256_and_si256(s, _mm256_set1_epi8(char(mask)));
  }

  static PE_INLINE I or_bits(I u, I v, int shift, int mask) { return _mm256_or_si256(u, bits(v, shift, mask)); }

 private:
  static PE_INLINE uint64_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  }
};

}  // namespace
}  // namespace pe::cpu

#include "cpu/matmul_simd.h"

namespace pe::cpu {

const MatmulKernels kAvx2Kernels = {quantize_x<Avx2>, gemm_quant<Avx2>, gemm_float_avx2};

}  // namespace pe::cpu
