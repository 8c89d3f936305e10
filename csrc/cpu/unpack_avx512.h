// AVX-512 weight unpacking for the matmul kernels: 16 rows of a block of any quantized type to vectors
// of u bytes (see quant_blocks.h), one int32 lane per row. Included by matmul_avx512.cpp only, so it is
// compiled with that file's ISA flags.
#pragma once
#include <immintrin.h>

#include <cstring>

#include "cpu/matmul_kernels.h"

// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu::avx512 {

constexpr int kPanel = 16;  // weight rows per panel: one int32 lane each

// A packer turns one unit (one or more sub-blocks) of a block of 16 rows into
// registers: per sub-block, G vectors where vector g holds u of elements 4g..4g+3 of row i in int32
// lane i; the 16 rows' scales (and mins) of every sub-block come with the block's State.

// 16 weight rows `stride` bytes apart.
struct PanelRows {
  const uint8_t* p;
  int64_t stride;
  PE_INLINE const uint8_t* at(int i, int64_t off) const { return p + i * stride + off; }
};

template <int S, int G>
struct Unit {
  __m512i u[S][G];
};

// Transposes 4x4 int32 blocks within each 128-bit lane.
PE_INLINE void transpose4x4(__m512i& a0, __m512i& a1, __m512i& a2, __m512i& a3) {
  const __m512i t0 = _mm512_unpacklo_epi32(a0, a1), t1 = _mm512_unpackhi_epi32(a0, a1);
  const __m512i t2 = _mm512_unpacklo_epi32(a2, a3), t3 = _mm512_unpackhi_epi32(a2, a3);
  a0 = _mm512_unpacklo_epi64(t0, t2);
  a1 = _mm512_unpackhi_epi64(t0, t2);
  a2 = _mm512_unpacklo_epi64(t1, t3);
  a3 = _mm512_unpackhi_epi64(t1, t3);
}

PE_INLINE __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// t[g] (g < 4): int32 lane i = bytes 4g..4g+3 of the 16 bytes at row i + off.
// Row 4j+k goes to 128-bit lane j of register k, so that the in-lane transpose leaves rows in order;
// masked broadcasts fill the lanes (a load plus a blend, which unlike vinserti32x4 is not tied to port 5).
PE_INLINE void load_transpose_16x16(const PanelRows& r, int64_t off, __m512i t[4]) {
  for (int k = 0; k < 4; k++) {
    __m512i a = _mm512_castsi128_si512(load128(r.at(k, off)));
    a = _mm512_mask_broadcast_i32x4(a, 0x00F0, load128(r.at(4 + k, off)));
    a = _mm512_mask_broadcast_i32x4(a, 0x0F00, load128(r.at(8 + k, off)));
    a = _mm512_mask_broadcast_i32x4(a, 0xF000, load128(r.at(12 + k, off)));
    t[k] = a;
  }
  transpose4x4(t[0], t[1], t[2], t[3]);
}

PE_INLINE uint64_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// The fp16 at row i + off, for the 16 rows, as floats. Composed in registers: going through a stack
// array instead (16 narrow stores, one wide load) measured slower, the failed store forwarding
// stalling the block.
PE_INLINE __m512 load_f16_x16(const PanelRows& r, int64_t off) {
  uint64_t q[4];
  for (int j = 0; j < 4; j++)
    q[j] = load_u16(r.at(4 * j, off)) | load_u16(r.at(4 * j + 1, off)) << 16 | load_u16(r.at(4 * j + 2, off)) << 32 |
           load_u16(r.at(4 * j + 3, off)) << 48;
  return _mm512_cvtph_ps(_mm256_set_epi64x(int64_t(q[3]), int64_t(q[2]), int64_t(q[1]), int64_t(q[0])));
}

PE_INLINE __m512i load_u32_x16(const PanelRows& r, int64_t off) {
  alignas(64) uint32_t h[16];
  for (int i = 0; i < 16; i++) std::memcpy(&h[i], r.at(i, off), 4);
  __asm__("" ::"m"(h));
  return _mm512_load_si512(h);
}

// Q4_0-style nibbles: groups 0..3 are the low nibbles of bytes 0..15, groups 4..7 the high ones.
PE_INLINE void nibble_groups(const __m512i t[4], __m512i out[8]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < 4; g++) {
    out[g] = _mm512_and_si512(t[g], m4);
    out[g + 4] = _mm512_and_si512(_mm512_srli_epi16(t[g], 4), m4);
  }
}

// Adds 16 to the bytes of group g (elements 4g..4g+3) whose bit in the 32-bit qh of their row is set.
PE_INLINE __m512i add_q5_high_bits(__m512i u, __m512i qh, int g) {
  // Every byte of lane i takes byte g/2 of qh[i]; the test then keeps bit 4g + (byte index).
  const __m512i idx = _mm512_add_epi8(
      _mm512_set_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000,
                       0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000),
      _mm512_set1_epi8(char(g / 2)));
  const __m512i bytes = _mm512_shuffle_epi8(qh, idx);
  const __m512i bits = _mm512_set1_epi32((g & 1) ? int32_t(0x80402010) : 0x08040201);
  const __mmask64 k = _mm512_test_epi8_mask(bytes, bits);
  return _mm512_mask_add_epi8(u, k, u, _mm512_set1_epi8(0x10));
}

// A packer describes one type: kBlock elements per ggml block of kBytes, sub-blocks of kSub = 4 kG
// elements, unpacked kSubsPerUnit sub-blocks at a time. begin() decodes what a block's units share
// (scales, mins, high bits) into a State; unpack() produces one unit's u vectors.

template <int NSUB>
struct ScaleState {
  __m512 scale[NSUB];
  __m512 min[NSUB];
};

// Masks a byte field: (v >> shift) & mask in every byte (32-bit shifts; the mask drops what crosses
// byte boundaries).
PE_INLINE __m512i bits(__m512i v, int shift, int mask) {
  const __m512i s = shift >= 0 ? _mm512_srli_epi32(v, shift) : _mm512_slli_epi32(v, -shift);
  return _mm512_and_si512(s, _mm512_set1_epi8(char(mask)));
}

// u | ((v >> shift) & mask) per byte, one ternary-logic op after the shift.
PE_INLINE __m512i or_bits(__m512i u, __m512i v, int shift, int mask) {
  const __m512i s = shift >= 0 ? _mm512_srli_epi32(v, shift) : _mm512_slli_epi32(v, -shift);
  return _mm512_ternarylogic_epi32(u, s, _mm512_set1_epi8(char(mask)), 0xF8);  // a | (b & c)
}

// Byte `i` (0..3) of each int32 lane, zero- or sign-extended to int32, as float.
PE_INLINE __m512 byte_u(__m512i v, int i, int shift, int mask) {
  return _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * i + shift), _mm512_set1_epi32(mask)));
}

struct PackQ4_0 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1, kBytes = sizeof(block_q4_0);
  static constexpr bool kMin = false;
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) { st.scale[0] = load_f16_x16(r, off); }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    __m512i t[4];
    load_transpose_16x16(r, off + 2, t);
    nibble_groups(t, out.u[0]);
  }
};

struct PackQ4_1 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1, kBytes = sizeof(block_q4_1);
  static constexpr bool kMin = true;
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    st.scale[0] = load_f16_x16(r, off);
    st.min[0] = load_f16_x16(r, off + 2);
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    __m512i t[4];
    load_transpose_16x16(r, off + 4, t);
    nibble_groups(t, out.u[0]);
  }
};

template <bool Q51>
struct PackQ5 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1;
  static constexpr int kBytes = Q51 ? sizeof(block_q5_1) : sizeof(block_q5_0);
  static constexpr bool kMin = Q51;
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    st.scale[0] = load_f16_x16(r, off);
    if (Q51) st.min[0] = load_f16_x16(r, off + 2);
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    constexpr int qh_off = Q51 ? 4 : 2;
    __m512i t[4];
    load_transpose_16x16(r, off + qh_off + 4, t);
    nibble_groups(t, out.u[0]);
    const __m512i qh = load_u32_x16(r, off + qh_off);
    for (int g = 0; g < 8; g++) out.u[0][g] = add_q5_high_bits(out.u[0][g], qh, g);
  }
};

struct PackQ8_0 {
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kSubsPerUnit = 1, kBytes = sizeof(block_q8_0);
  static constexpr bool kMin = false;
  using State = ScaleState<1>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) { st.scale[0] = load_f16_x16(r, off); }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int, const State&, Unit<1, 8>& out) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));  // int8 q -> u = q + 128
    __m512i t[4];
    load_transpose_16x16(r, off + 2, t);
    for (int g = 0; g < 4; g++) out.u[0][g] = _mm512_xor_si512(t[g], flip);
    load_transpose_16x16(r, off + 18, t);
    for (int g = 0; g < 4; g++) out.u[0][g + 4] = _mm512_xor_si512(t[g], flip);
  }
};

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin. Element 128n + 32j + l is
// bits 2j..2j+1 of qs[32n + l]; unit n holds sub-blocks 8n..8n+7 (sub-block 8n + 2j + l / 16).
struct PackQ2_K {
  static constexpr int kBlock = QK_K, kSub = 16, kG = 4, kSubsPerUnit = 8, kBytes = sizeof(block_q2_K);
  static constexpr bool kMin = true;
  using State = ScaleState<16>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m512 d = load_f16_x16(r, off + 80), dmin = load_f16_x16(r, off + 82);
    __m512i s[4];
    load_transpose_16x16(r, off, s);
    for (int j = 0; j < 16; j++) {
      st.scale[j] = _mm512_mul_ps(d, byte_u(s[j / 4], j % 4, 0, 0xF));
      st.min[j] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, byte_u(s[j / 4], j % 4, 4, 0xF)));
    }
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int n, const State&, Unit<8, 4>& out) {
    __m512i q[8];
    load_transpose_16x16(r, off + 16 + 32 * n, q);
    load_transpose_16x16(r, off + 32 + 32 * n, q + 4);
    for (int j = 0; j < 4; j++)
      for (int h = 0; h < 2; h++)
        for (int g = 0; g < 4; g++) out.u[2 * j + h][g] = bits(q[4 * h + g], 2 * j, 3);
  }
};

// Q3_K: hmask[32], qs[64], scales[12] (16 6-bit values, offset 32), d. Element 128n + 32j + l is bits
// 2j..2j+1 of qs[32n + l] plus 4 * bit (4n + j) of hmask[l]; unit n holds sub-blocks 8n..8n+7.
struct PackQ3_K {
  static constexpr int kBlock = QK_K, kSub = 16, kG = 4, kSubsPerUnit = 8, kBytes = sizeof(block_q3_K);
  static constexpr bool kMin = false;
  struct State : ScaleState<16> {
    __m512i hm[8];
  };
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m512 d = load_f16_x16(r, off + 108);
    __m512i s[4];  // bytes 92..107: s[1..3] are the scales (the read stays inside the block)
    load_transpose_16x16(r, off + 92, s);
    for (int j = 0; j < 16; j++) {
      const __m512i lo = _mm512_and_si512(_mm512_srli_epi32(s[1 + (j % 8) / 4], 8 * (j % 4) + 4 * (j / 8)),
                                          _mm512_set1_epi32(0xF));
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(s[3], 8 * (j % 4) + 2 * (j / 4)), _mm512_set1_epi32(3));
      const __m512i sc = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
      st.scale[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
    }
    load_transpose_16x16(r, off, st.hm);
    load_transpose_16x16(r, off + 16, st.hm + 4);
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int n, const State& st, Unit<8, 4>& out) {
    __m512i q[8];
    load_transpose_16x16(r, off + 32 + 32 * n, q);
    load_transpose_16x16(r, off + 48 + 32 * n, q + 4);
    for (int j = 0; j < 4; j++)
      for (int h = 0; h < 2; h++)
        for (int g = 0; g < 4; g++) {
          const int b = 4 * n + j;  // hmask bit, moved to bit 2
          out.u[2 * j + h][g] = or_bits(bits(q[4 * h + g], 2 * j, 3), st.hm[4 * h + g], b - 2, 4);
        }
  }
};

// Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, (Q5_K: qh[32]), qs[128]. Sub-block 2c is the
// low nibbles of qs[32c..32c+32), 2c+1 the high ones; Q5_K's fifth bit of element 32j + l is bit j of
// qh[l]. Unit c holds sub-blocks 2c and 2c+1.
template <bool Q5>
struct PackQ45_K {
  static constexpr int kBlock = QK_K, kSub = 32, kG = 8, kSubsPerUnit = 2;
  static constexpr int kBytes = Q5 ? sizeof(block_q5_K) : sizeof(block_q4_K);
  static constexpr bool kMin = true;
  struct State : ScaleState<8> {
    __m512i qh[Q5 ? 8 : 1];
  };
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m512 d = load_f16_x16(r, off), dmin = load_f16_x16(r, off + 2);
    __m512i s[4];  // bytes 4..19: s[0..2] are the 12 scale bytes
    load_transpose_16x16(r, off + 4, s);
    for (int j = 0; j < 8; j++) {
      __m512i sc, m;
      if (j < 4) {
        sc = _mm512_and_si512(_mm512_srli_epi32(s[0], 8 * j), _mm512_set1_epi32(63));
        m = _mm512_and_si512(_mm512_srli_epi32(s[1], 8 * j), _mm512_set1_epi32(63));
      } else {
        const int i = 8 * (j - 4);
        sc = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(s[2], i), _mm512_set1_epi32(0xF)),
                             _mm512_and_si512(_mm512_srli_epi32(s[0], i + 2), _mm512_set1_epi32(0x30)));
        m = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(s[2], i + 4), _mm512_set1_epi32(0xF)),
                            _mm512_and_si512(_mm512_srli_epi32(s[1], i + 2), _mm512_set1_epi32(0x30)));
      }
      st.scale[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
      st.min[j] = _mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(m)));
    }
    if (Q5) {
      load_transpose_16x16(r, off + 16, st.qh);
      load_transpose_16x16(r, off + 32, st.qh + 4);
    }
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int c, const State& st, Unit<2, 8>& out) {
    const int qs = (Q5 ? 48 : 16) + 32 * c;
    __m512i t[8];
    load_transpose_16x16(r, off + qs, t);
    load_transpose_16x16(r, off + qs + 16, t + 4);
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

// Q6_K: ql[128], qh[64], int8 scales[16], d. Element 128n + 64s + t is nibble s of ql[64n + t] plus
// bits 2k..2k+1 of qh[32n + t % 32] (k = 2s + t / 32) times 16; unit n holds sub-blocks 8n..8n+7.
struct PackQ6_K {
  static constexpr int kBlock = QK_K, kSub = 16, kG = 4, kSubsPerUnit = 8, kBytes = sizeof(block_q6_K);
  static constexpr bool kMin = false;
  using State = ScaleState<16>;
  static PE_INLINE void begin(const PanelRows& r, int64_t off, State& st) {
    const __m512 d = load_f16_x16(r, off + 208);
    __m512i s[4];
    load_transpose_16x16(r, off + 192, s);
    for (int j = 0; j < 16; j++) {
      const __m512i sc = _mm512_srai_epi32(_mm512_slli_epi32(s[j / 4], 24 - 8 * (j % 4)), 24);
      st.scale[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
    }
  }
  static PE_INLINE void unpack(const PanelRows& r, int64_t off, int n, const State&, Unit<8, 4>& out) {
    __m512i ql[16], qh[8];
    for (int i = 0; i < 4; i++) load_transpose_16x16(r, off + 64 * n + 16 * i, ql + 4 * i);
    for (int i = 0; i < 2; i++) load_transpose_16x16(r, off + 128 + 32 * n + 16 * i, qh + 4 * i);
    for (int sub = 0; sub < 8; sub++) {
      const int s = sub / 4;
      for (int gg = 0; gg < 4; gg++) {
        const int g = 4 * (sub % 4) + gg;  // group within the 64 ql bytes
        const int k = 2 * s + g / 8;
        out.u[sub][gg] = or_bits(bits(ql[g], 4 * s, 0xF), qh[g % 8], 2 * k - 4, 0x30);
      }
    }
  }
};

template <class P>
constexpr int kUnits = P::kBlock / (P::kSub * P::kSubsPerUnit);

template <class P>
using UnitOf = Unit<P::kSubsPerUnit, P::kG>;

}  // namespace pe::cpu::avx512
