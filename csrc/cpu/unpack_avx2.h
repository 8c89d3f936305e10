// AVX2 weight unpacking for the matmul kernels: 8 rows of a block of any quantized type to vectors of u
// bytes (see quant_blocks.h and unpack_avx512.h), one int32 lane per row. Included by matmul_avx2.cpp
// only, so it is compiled with that file's ISA flags.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "cpu/matmul_kernels.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu::avx2 {

constexpr int kPanel = 8;  // weight rows per panel: one int32 lane each

struct PanelRows {
  const uint8_t* p;
  int64_t stride;
  PE_INLINE const uint8_t* at(int i, int64_t off) const { return p + i * stride + off; }
};

template <int S, int G>
struct Unit {
  __m256i u[S][G];
};

PE_INLINE __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// t[g] (g < 4): int32 lane i = bytes 4g..4g+3 of the 16 bytes at row i + off (rows 4j+k in lane j of
// register k, so that the in-lane 4x4 transpose leaves them in order).
PE_INLINE void load_transpose_8x16(const PanelRows& r, int64_t off, __m256i t[4]) {
  for (int k = 0; k < 4; k++) t[k] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(r.at(4 + k, off)),
                                                         reinterpret_cast<const __m128i*>(r.at(k, off)));
  const __m256i a0 = _mm256_unpacklo_epi32(t[0], t[1]), a1 = _mm256_unpackhi_epi32(t[0], t[1]);
  const __m256i a2 = _mm256_unpacklo_epi32(t[2], t[3]), a3 = _mm256_unpackhi_epi32(t[2], t[3]);
  t[0] = _mm256_unpacklo_epi64(a0, a2);
  t[1] = _mm256_unpackhi_epi64(a0, a2);
  t[2] = _mm256_unpacklo_epi64(a1, a3);
  t[3] = _mm256_unpackhi_epi64(a1, a3);
}

PE_INLINE uint64_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

PE_INLINE __m256 load_f16_x8(const PanelRows& r, int64_t off) {
  uint64_t q[2];
  for (int j = 0; j < 2; j++)
    q[j] = load_u16(r.at(4 * j, off)) | load_u16(r.at(4 * j + 1, off)) << 16 | load_u16(r.at(4 * j + 2, off)) << 32 |
           load_u16(r.at(4 * j + 3, off)) << 48;
  return _mm256_cvtph_ps(_mm_set_epi64x(int64_t(q[1]), int64_t(q[0])));
}

PE_INLINE __m256i load_u32_x8(const PanelRows& r, int64_t off) {
  int32_t h[8];
  for (int i = 0; i < 8; i++) std::memcpy(&h[i], r.at(i, off), 4);
  return _mm256_setr_epi32(h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
}

PE_INLINE void nibble_groups(const __m256i t[4], __m256i out[8]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  for (int g = 0; g < 4; g++) {
    out[g] = _mm256_and_si256(t[g], m4);
    out[g + 4] = _mm256_and_si256(_mm256_srli_epi16(t[g], 4), m4);
  }
}

// Adds 16 to the bytes of group g (elements 4g..4g+3) whose bit in the 32-bit qh of their row is set.
PE_INLINE __m256i add_q5_high_bits(__m256i u, __m256i qh, int g) {
  const __m256i idx = _mm256_add_epi8(_mm256_setr_epi32(0, 0x04040404, 0x08080808, 0x0C0C0C0C, 0, 0x04040404,
                                                        0x08080808, 0x0C0C0C0C),
                                      _mm256_set1_epi8(char(g / 2)));
  const __m256i bits = _mm256_set1_epi32((g & 1) ? int32_t(0x80402010) : 0x08040201);
  const __m256i sel = _mm256_and_si256(_mm256_shuffle_epi8(qh, idx), bits);
  const __m256i set = _mm256_cmpeq_epi8(sel, bits);  // 0xFF where the bit is set
  return _mm256_add_epi8(u, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
}

// A packer describes one type (see unpack_avx512.h): begin() decodes what a block's units share
// (scales, mins, high bits) into a State; unpack() produces one unit's u vectors.

template <int NSUB>
struct ScaleState {
  __m256 scale[NSUB];
  __m256 min[NSUB];
};

// (v >> shift) & mask in every byte (32-bit shifts; the mask drops what crosses byte boundaries).
PE_INLINE __m256i bits(__m256i v, int shift, int mask) {
  const __m256i s = shift >= 0 ? _mm256_srli_epi32(v, shift) : _mm256_slli_epi32(v, -shift);
  return _mm256_and_si256(s, _mm256_set1_epi8(char(mask)));
}

PE_INLINE __m256i or_bits(__m256i u, __m256i v, int shift, int mask) {
  return _mm256_or_si256(u, bits(v, shift, mask));
}

// ((v >> (8 i + shift)) & mask) per int32 lane, as float.
PE_INLINE __m256 byte_u(__m256i v, int i, int shift, int mask) {
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * i + shift), _mm256_set1_epi32(mask)));
}

PE_INLINE __m256 neg(__m256 v) { return _mm256_sub_ps(_mm256_setzero_ps(), v); }

// kGS: groups whose pmaddubsw results can be summed in int16 (2 * max_u * 127 * kGS <= 32767).
struct PackQ4_0 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1, kBytes = sizeof(block_q4_0), kGS = 8;
  static constexpr bool kMin = false, kSigned = false;
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) { st.scale[0] = load_f16_x8(r, off); }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    __m256i t[4];
    load_transpose_8x16(r, off + 2, t);
    nibble_groups(t, out.u[0]);
  }
};

struct PackQ4_1 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1, kBytes = sizeof(block_q4_1), kGS = 8;
  static constexpr bool kMin = true, kSigned = false;
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    st.scale[0] = load_f16_x8(r, off);
    st.min[0] = load_f16_x8(r, off + 2);
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    __m256i t[4];
    load_transpose_8x16(r, off + 4, t);
    nibble_groups(t, out.u[0]);
  }
};

template <bool Q51>
struct PackQ5 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1, kGS = 4;
  static constexpr int kBytes = Q51 ? sizeof(block_q5_1) : sizeof(block_q5_0);
  static constexpr bool kMin = Q51, kSigned = false;
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    st.scale[0] = load_f16_x8(r, off);
    if (Q51) st.min[0] = load_f16_x8(r, off + 2);
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    constexpr int qh_off = Q51 ? 4 : 2;
    __m256i t[4];
    load_transpose_8x16(r, off + qh_off + 4, t);
    nibble_groups(t, out.u[0]);
    const __m256i qh = load_u32_x8(r, off + qh_off);
    for (int g = 0; g < 8; g++) out.u[0][g] = add_q5_high_bits(out.u[0][g], qh, g);
  }
};

struct PackQ8_0 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1, kBytes = sizeof(block_q8_0), kGS = 1;
  static constexpr bool kMin = false, kSigned = true;  // u holds the signed q; the bias is not used
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) { st.scale[0] = load_f16_x8(r, off); }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    __m256i t[4];
    load_transpose_8x16(r, off + 2, t);
    for (int g = 0; g < 4; g++) out.u[0][g] = t[g];
    load_transpose_8x16(r, off + 18, t);
    for (int g = 0; g < 4; g++) out.u[0][g + 4] = t[g];
  }
};

// K-quants: layouts as documented in unpack_avx512.h.
struct PackQ2_K {
  static constexpr int kBlock = QK_K, kSub = 16, kG = 4, kSubsPerUnit = 8, kBytes = sizeof(block_q2_K), kGS = 4;
  static constexpr bool kMin = true, kSigned = false;
  using State = ScaleState<16>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m256 d = load_f16_x8(r, off + 80), dmin = load_f16_x8(r, off + 82);
    __m256i s[4];
    load_transpose_8x16(r, off, s);
    for (int j = 0; j < 16; j++) {
      st.scale[j] = _mm256_mul_ps(d, byte_u(s[j / 4], j % 4, 0, 0xF));
      st.min[j] = neg(_mm256_mul_ps(dmin, byte_u(s[j / 4], j % 4, 4, 0xF)));
    }
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int n, const State&, Unit<8, 4>& out) {
    __m256i q[8];
    load_transpose_8x16(r, off + 16 + 32 * n, q);
    load_transpose_8x16(r, off + 32 + 32 * n, q + 4);
    for (int j = 0; j < 4; j++)
      for (int h = 0; h < 2; h++)
        for (int g = 0; g < 4; g++) out.u[2 * j + h][g] = bits(q[4 * h + g], 2 * j, 3);
  }
};

struct PackQ3_K {
  static constexpr int kBlock = QK_K, kSub = 16, kG = 4, kSubsPerUnit = 8, kBytes = sizeof(block_q3_K), kGS = 4;
  static constexpr bool kMin = false, kSigned = false;
  struct State : ScaleState<16> {
    __m256i hm[8];
  };
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m256 d = load_f16_x8(r, off + 108);
    __m256i s[4];  // bytes 92..107: s[1..3] are the scales
    load_transpose_8x16(r, off + 92, s);
    for (int j = 0; j < 16; j++) {
      const __m256i lo = _mm256_and_si256(_mm256_srli_epi32(s[1 + (j % 8) / 4], 8 * (j % 4) + 4 * (j / 8)),
                                          _mm256_set1_epi32(0xF));
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi32(s[3], 8 * (j % 4) + 2 * (j / 4)), _mm256_set1_epi32(3));
      const __m256i sc = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
      st.scale[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
    }
    load_transpose_8x16(r, off, st.hm);
    load_transpose_8x16(r, off + 16, st.hm + 4);
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int n, const State& st, Unit<8, 4>& out) {
    __m256i q[8];
    load_transpose_8x16(r, off + 32 + 32 * n, q);
    load_transpose_8x16(r, off + 48 + 32 * n, q + 4);
    for (int j = 0; j < 4; j++)
      for (int h = 0; h < 2; h++)
        for (int g = 0; g < 4; g++)
          out.u[2 * j + h][g] = or_bits(bits(q[4 * h + g], 2 * j, 3), st.hm[4 * h + g], 4 * n + j - 2, 4);
  }
};

template <bool Q5>
struct PackQ45_K {
  static constexpr int kBlock = QK_K, kSub = 32, kG = 8, kSubsPerUnit = 2, kGS = Q5 ? 4 : 8;
  static constexpr int kBytes = Q5 ? sizeof(block_q5_K) : sizeof(block_q4_K);
  static constexpr bool kMin = true, kSigned = false;
  struct State : ScaleState<8> {
    __m256i qh[Q5 ? 8 : 1];
  };
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m256 d = load_f16_x8(r, off), dmin = load_f16_x8(r, off + 2);
    __m256i s[4];  // bytes 4..19: s[0..2] are the 12 scale bytes
    load_transpose_8x16(r, off + 4, s);
    for (int j = 0; j < 8; j++) {
      __m256i sc, m;
      if (j < 4) {
        sc = _mm256_and_si256(_mm256_srli_epi32(s[0], 8 * j), _mm256_set1_epi32(63));
        m = _mm256_and_si256(_mm256_srli_epi32(s[1], 8 * j), _mm256_set1_epi32(63));
      } else {
        const int i = 8 * (j - 4);
        sc = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(s[2], i), _mm256_set1_epi32(0xF)),
                             _mm256_and_si256(_mm256_srli_epi32(s[0], i + 2), _mm256_set1_epi32(0x30)));
        m = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(s[2], i + 4), _mm256_set1_epi32(0xF)),
                            _mm256_and_si256(_mm256_srli_epi32(s[1], i + 2), _mm256_set1_epi32(0x30)));
      }
      st.scale[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
      st.min[j] = neg(_mm256_mul_ps(dmin, _mm256_cvtepi32_ps(m)));
    }
    if (Q5) {
      load_transpose_8x16(r, off + 16, st.qh);
      load_transpose_8x16(r, off + 32, st.qh + 4);
    }
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int c, const State& st, Unit<2, 8>& out) {
    const int qs = (Q5 ? 48 : 16) + 32 * c;
    __m256i t[8];
    load_transpose_8x16(r, off + qs, t);
    load_transpose_8x16(r, off + qs + 16, t + 4);
    for (int g = 0; g < 8; g++) {
      out.u[0][g] = bits(t[g], 0, 0xF);
      out.u[1][g] = bits(t[g], 4, 0xF);
      if (Q5) {
        out.u[0][g] = or_bits(out.u[0][g], st.qh[g], 2 * c - 4, 0x10);
        out.u[1][g] = or_bits(out.u[1][g], st.qh[g], 2 * c + 1 - 4, 0x10);
      }
    }
  }
};
using PackQ4_K = PackQ45_K<false>;
using PackQ5_K = PackQ45_K<true>;

struct PackQ6_K {
  static constexpr int kBlock = QK_K, kSub = 16, kG = 4, kSubsPerUnit = 8, kBytes = sizeof(block_q6_K), kGS = 2;
  static constexpr bool kMin = false, kSigned = false;
  using State = ScaleState<16>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m256 d = load_f16_x8(r, off + 208);
    __m256i s[4];
    load_transpose_8x16(r, off + 192, s);
    for (int j = 0; j < 16; j++) {
      const __m256i sc = _mm256_srai_epi32(_mm256_slli_epi32(s[j / 4], 24 - 8 * (j % 4)), 24);
      st.scale[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(sc));
    }
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int n, const State&, Unit<8, 4>& out) {
    __m256i ql[16], qh[8];
    for (int i = 0; i < 4; i++) load_transpose_8x16(r, off + 64 * n + 16 * i, ql + 4 * i);
    for (int i = 0; i < 2; i++) load_transpose_8x16(r, off + 128 + 32 * n + 16 * i, qh + 4 * i);
    for (int sub = 0; sub < 8; sub++) {
      const int s = sub / 4;
      for (int gg = 0; gg < 4; gg++) {
        const int g = 4 * (sub % 4) + gg;
        out.u[sub][gg] = or_bits(bits(ql[g], 4 * s, 0xF), qh[g % 8], 2 * (2 * s + g / 8) - 4, 0x30);
      }
    }
  }
};

template <class P>
constexpr int kUnits = P::kBlock / (P::kSub * P::kSubsPerUnit);

template <class P>
using UnitOf = Unit<P::kSubsPerUnit, P::kG>;

}  // namespace pe::cpu::avx2
