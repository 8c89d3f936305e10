// AVX-512 matmul kernels (F, BW, VL, DQ, VNNI): the vector traits for matmul_simd.h, which holds the
// kernels, and the same kernels with prefill on AMX tiles (matmul_amx.h). This file is compiled with
// those ISA flags (AMX-TILE and AMX-INT8 too; only kAmxKernels' prefill runs AMX instructions) and is
// only called once cpu_path() says the CPU has them. Float weights are in matmul_float_avx512.cpp.
#include <immintrin.h>

#include <cstring>

// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "cpu/matmul_kernels.h"
#include "cpu/unpack_simd.h"

namespace pe::cpu {
namespace {

struct Avx512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kRows = 16;           // weight rows per panel: one int32 lane each
  static constexpr bool kVnni = true;        // integer dot step: vpdpbusd
  static constexpr int kMaxSmallM = 8;       // up to this many activation rows, decode kernels
  static constexpr int kSmallPasses = 2;     // ... in passes up to this many times that (see Avx2; on AMD
                                             // DecodeTuning::small_passes_32 for the 32-element types)
  static constexpr int kTileM = 6;           // activation rows per prefill register tile ...
  static constexpr int kPrefillPanels = 2;   // ... times this many panels
  // Decode: two panels per loop for every type: with 32 zmm registers a K-quant block's state fits
  // twice (random 1.1B files, 2 threads, after the panel prefetch: Q4_K_M 37.7 -> 40.6 tok/s, Q4_K_S
  // 39.6 -> 42.9, Q3_K_M 40.7 -> 43.3, Q6_K 27.6 -> 29.1; 3 rows unchanged), where DecodeTuning
  // asks for two (not on AMD CPUs).
  template <class P>
  static constexpr int decode_panels() { return 2; }

  // Integer ops.
  static PE_INLINE I zero_i() { return _mm512_setzero_si512(); }
  static PE_INLINE I set1_i8(int v) { return _mm512_set1_epi8(char(v)); }
  static PE_INLINE I set1_i16(int v) { return _mm512_set1_epi16(short(v)); }
  static PE_INLINE I set1_i32(int v) { return _mm512_set1_epi32(v); }
  static PE_INLINE I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static PE_INLINE I or_(I a, I b) { return _mm512_or_si512(a, b); }
  static PE_INLINE I xor_(I a, I b) { return _mm512_xor_si512(a, b); }
  static PE_INLINE I add_i32(I a, I b) { return _mm512_add_epi32(a, b); }
  static PE_INLINE I sub_i32(I a, I b) { return _mm512_sub_epi32(a, b); }
  static PE_INLINE I sub_i8(I a, I b) { return _mm512_sub_epi8(a, b); }
  static PE_INLINE I srli_i16(I v, int n) { return _mm512_srli_epi16(v, n); }
  static PE_INLINE I srli_i32(I v, int n) { return _mm512_srli_epi32(v, n); }
  static PE_INLINE I slli_i32(I v, int n) { return _mm512_slli_epi32(v, n); }
  static PE_INLINE I srai_i32(I v, int n) { return _mm512_srai_epi32(v, n); }
  static PE_INLINE I load_i(const void* p) { return _mm512_load_si512(p); }
  static PE_INLINE I loadu_i(const void* p) { return _mm512_loadu_si512(p); }
  static PE_INLINE void store_i(void* p, I v) { _mm512_store_si512(p, v); }
  static PE_INLINE I dpbusd(I acc, I u, I x) { return _mm512_dpbusd_epi32(acc, u, x); }
  // The lane sums of a and of b, through one reduction tree.
  static PE_INLINE void hsum2_i32(I a, I b, int& sa, int& sb) {
    I s = _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x44), _mm512_shuffle_i64x2(a, b, 0xEE));
    s = _mm512_add_epi32(s, _mm512_shuffle_i64x2(s, s, 0xB1));  // a's sum in 128-bit lane 0, b's in lane 2
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_BADC));
    s = _mm512_add_epi32(s, _mm512_shuffle_epi32(s, _MM_PERM_CDAB));
    sa = _mm_cvtsi128_si32(_mm512_castsi512_si128(s));
    sb = _mm_cvtsi128_si32(_mm512_extracti32x4_epi32(s, 2));
  }
  // |v|'s bits: for floats of one sign, integer order is float order, and >= 0x7f800000 is NaN or Inf.
  static PE_INLINE I abs_bits(F v) { return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)); }
  static PE_INLINE I max_u32(I a, I b) { return _mm512_max_epu32(a, b); }
  static PE_INLINE uint32_t hmax_u32(I v) { return _mm512_reduce_max_epu32(v); }

  // Float ops.
  static PE_INLINE F zero_ps() { return _mm512_setzero_ps(); }
  static PE_INLINE F set1_ps(float v) { return _mm512_set1_ps(v); }
  static PE_INLINE F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static PE_INLINE I cvt_i32(F v) { return _mm512_cvtps_epi32(v); }
  static PE_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static PE_INLINE F neg(F v) { return _mm512_sub_ps(_mm512_setzero_ps(), v); }
  static PE_INLINE F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static PE_INLINE F load_ps(const void* p) { return _mm512_load_ps(p); }
  // 16 fp16 side by side (a packed panel's scales) as floats.
  static PE_INLINE F cvt_f16(const void* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p))); }
  static PE_INLINE F loadu_ps(const float* p) { return _mm512_loadu_ps(p); }
  static PE_INLINE void store_ps(void* p, F v) { _mm512_store_ps(p, v); }
  static PE_INLINE void storeu_ps(float* p, F v) { _mm512_storeu_ps(p, v); }
  static PE_INLINE void store_rows(float* p, F v, int64_t n) { _mm512_mask_storeu_ps(p, __mmask16((1u << n) - 1), v); }

  // 32 int32 (|q| <= 127) to 32 int8.
  static PE_INLINE void store_q8(int8_t* dst, const I q[2]) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(q[0]));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(q[1]));
  }

  // Unpacking.

  // t[g] (g < 4): int32 lane i = bytes 4g..4g+3 of the 16 bytes at row i + off.
  // Row 4j+k goes to 128-bit lane j of register k, so that the in-lane 4x4 transpose leaves rows in
  // order; masked broadcasts fill the lanes (a load plus a blend, which unlike vinserti32x4 is not tied
  // to port 5).
  static PE_INLINE void load_transpose(const PanelRows& r, int64_t off, I t[4]) {
    for (int k = 0; k < 4; k++) {
      I a = _mm512_castsi128_si512(load128(r.at(k, off)));
      a = _mm512_mask_broadcast_i32x4(a, 0x00F0, load128(r.at(4 + k, off)));
      a = _mm512_mask_broadcast_i32x4(a, 0x0F00, load128(r.at(8 + k, off)));
      a = _mm512_mask_broadcast_i32x4(a, 0xF000, load128(r.at(12 + k, off)));
      t[k] = a;
    }
    const I t0 = _mm512_unpacklo_epi32(t[0], t[1]), t1 = _mm512_unpackhi_epi32(t[0], t[1]);
    const I t2 = _mm512_unpacklo_epi32(t[2], t[3]), t3 = _mm512_unpackhi_epi32(t[2], t[3]);
    t[0] = _mm512_unpacklo_epi64(t0, t2);
    t[1] = _mm512_unpackhi_epi64(t0, t2);
    t[2] = _mm512_unpacklo_epi64(t1, t3);
    t[3] = _mm512_unpackhi_epi64(t1, t3);
  }

  // The fp16 at row i + off, for the 16 rows, as floats. Composed in registers: going through a stack
  // array instead (16 narrow stores, one wide load) measured slower, the failed store forwarding
  // stalling the block.
  static PE_INLINE F load_f16(const PanelRows& r, int64_t off) {
    uint64_t q[4];
    for (int j = 0; j < 4; j++)
      q[j] = load_u16(r.at(4 * j, off)) | load_u16(r.at(4 * j + 1, off)) << 16 |
             load_u16(r.at(4 * j + 2, off)) << 32 | load_u16(r.at(4 * j + 3, off)) << 48;
    return _mm512_cvtph_ps(_mm256_set_epi64x(int64_t(q[3]), int64_t(q[2]), int64_t(q[1]), int64_t(q[0])));
  }

  static PE_INLINE I load_u32(const PanelRows& r, int64_t off) {
    alignas(64) uint32_t h[16];
    for (int i = 0; i < 16; i++) std::memcpy(&h[i], r.at(i, off), 4);
    __asm__("" ::"m"(h));
    return _mm512_load_si512(h);
  }

  // Adds 16 to the bytes of group g (elements 4g..4g+3) whose bit in the 32-bit qh of their row is set.
  static PE_INLINE I add_q5_high_bits(I u, I qh, int g) {
    // Every byte of lane i takes byte g/2 of qh[i]; the test then keeps bit 4g + (byte index).
    const I idx = _mm512_add_epi8(
        _mm512_set_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404,
                         0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808,
                         0x04040404, 0x00000000),
        _mm512_set1_epi8(char(g / 2)));
    const I bytes = _mm512_shuffle_epi8(qh, idx);
    const I bits = _mm512_set1_epi32((g & 1) ? int32_t(0x80402010) : 0x08040201);
    const __mmask64 k = _mm512_test_epi8_mask(bytes, bits);
    return _mm512_mask_add_epi8(u, k, u, _mm512_set1_epi8(0x10));
  }

  // (v >> shift) & mask in every byte (32-bit shifts; the mask drops what crosses byte boundaries).
  static PE_INLINE I bits(I v, int shift, int mask) {
    const I s = shift >= 0 ? _mm512_srli_epi32(v, shift) : _mm512_slli_epi32(v, -shift);
    return _mm512_and_si512(s, _mm512_set1_epi8(char(mask)));
  }

  // u | ((v >> shift) & mask) per byte, one ternary-logic op after the shift.
  static PE_INLINE I or_bits(I u, I v, int shift, int mask) {
    const I s = shift >= 0 ? _mm512_srli_epi32(v, shift) : _mm512_slli_epi32(v, -shift);
    return _mm512_ternarylogic_epi32(u, s, _mm512_set1_epi8(char(mask)), 0xF8);  // a | (b & c)
  }

 private:
  static PE_INLINE __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  static PE_INLINE uint64_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
  }
};

}  // namespace
}  // namespace pe::cpu

#include "cpu/matmul_simd.h"
#include "cpu/matmul_amx.h"
#include "cpu/matmul_amx_bf16.h"

namespace pe::cpu {

const MatmulKernels kAvx512Kernels = {quantize_x<Avx512>, gemm_quant<Avx512>, gemm_float_avx512};
const MatmulKernels kAmxKernels = {quantize_x<Avx512>, gemm_quant<Avx512, AmxTiles>, gemm_float_avx512,
                                   pack_x_bf16, gemm_bf16_supports, gemm_bf16};

}  // namespace pe::cpu
