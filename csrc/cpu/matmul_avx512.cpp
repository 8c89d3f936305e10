// AVX-512 matmul kernels (F, BW, VL, DQ, VNNI). This file is compiled with those ISA flags and is only
// called once cpu_path() says the CPU has them.
//
// Quantized weights: a "panel" is 16 weight rows. Packing a panel's block transposes it so that one
// zmm holds 4 consecutive elements (u bytes, see quant_blocks.h) of each of the 16 rows: one
// vpdpbusd against 4 activation bytes broadcast to every lane then advances 16 row dot products at
// once, and each sub-block ends with a single convert + scale + accumulate for all 16 rows, with no
// horizontal reductions. Prefill packs whole panels once and streams every activation row over them
// (a 32-row x 6-activation-row register tile); decode unpacks block by block into registers and uses
// them at once. Float weights: dot-product tiles for few activation rows, transposed float panels and
// broadcast FMAs for many.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/matmul_kernels.h"

// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu {

namespace {

constexpr int kPanel = 16;     // weight rows per panel: one int32 lane each
constexpr int kMaxSmallM = 3;  // up to this many activation rows, unpack and use at once (no panel reuse)
constexpr int kTileM = 6;      // activation rows per register tile when whole panels are packed

PE_INLINE int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Activation quantization (see QuantizedX): rounding through cvtps2dq is round-half-even, as the
// portable path's nearbyint.

void quantize_x(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k, const QuantScheme& s,
                const QuantizedX& out) {
  for (int64_t r = m0; r < m1; r++) {
    const float* xr = x + r * ldx;
    int8_t* q = out.q + r * out.ldq;
    XSub* sub = out.sub + r * out.ldsub;
    for (int64_t b = 0; b < k / 32; b++) {
      const __m512 v0 = _mm512_loadu_ps(xr + 32 * b), v1 = _mm512_loadu_ps(xr + 32 * b + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.0f;
      const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
      const __m512 vid = _mm512_set1_ps(id);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtepi32_epi8(q1));
      const int s0 = _mm512_reduce_add_epi32(q0), s1 = _mm512_reduce_add_epi32(q1);
      if (s.sub == 16) {
        sub[2 * b] = XSub{-s.offset * s0, d, d * float(s0), 0.0f};
        sub[2 * b + 1] = XSub{-s.offset * s1, d, d * float(s1), 0.0f};
      } else {
        sub[b] = XSub{-s.offset * (s0 + s1), d, d * float(s0 + s1), 0.0f};
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Weight unpacking. A packer turns one unit (one or more sub-blocks) of a block of 16 rows into
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

// The panel at rows [rp, rp + 16) of w; a last panel with fewer rows is copied to `tail` with its last
// row repeated, so that kernels always read 16 evenly spaced rows (the copies' results are not stored).
template <class P>
PanelRows panel_at(const WeightView& w, int64_t rp, int64_t r1, ScratchBuffer& tail) {
  const auto* base = static_cast<const uint8_t*>(w.data);
  if (r1 - rp >= kPanel) return PanelRows{base + rp * int64_t(w.row_stride), int64_t(w.row_stride)};
  const int64_t rb = w.cols / P::kBlock * P::kBytes;
  auto* d = static_cast<uint8_t*>(tail.get(size_t(kPanel * rb)));
  for (int i = 0; i < kPanel; i++) std::memcpy(d + i * rb, base + std::min(rp + i, r1 - 1) * int64_t(w.row_stride), rb);
  return PanelRows{d, rb};
}

// Writes 16-row results for NC activation rows to y[c * ldy + row0 + lane], keeping the first nrows.
template <int NC>
PE_INLINE void store_panel(const __m512 (&acc)[NC], float* y, int64_t ldy, int64_t row0, int64_t nrows) {
  for (int c = 0; c < NC; c++) {
    float* dst = y + c * ldy + row0;
    if (nrows >= kPanel) _mm512_storeu_ps(dst, acc[c]);
    else _mm512_mask_storeu_ps(dst, __mmask16((1u << nrows) - 1), acc[c]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Decode (few activation rows): unpack each unit of a panel into registers and use it at once.

// Sub-blocks j0b.. of the unit's block (global sub-block index j0..) against NC activation rows.
template <class P, int NC>
PE_INLINE void dot_unit(const UnitOf<P>& un, const typename P::State& st, int j0b, int64_t j0, const int8_t* xq,
                        int64_t ldq, const XSub* xs, int64_t ldxs, __m512 (&acc)[NC]) {
#pragma GCC unroll 4
  for (int s = 0; s < P::kSubsPerUnit; s++) {
    const int64_t j = j0 + s;
    // Two accumulators per row halve the vpdpbusd dependency chain.
    __m512i ai[NC], bi[NC];
#pragma GCC unroll 4
    for (int c = 0; c < NC; c++) {
      ai[c] = _mm512_set1_epi32(xs[c * ldxs + j].bias);
      bi[c] = _mm512_setzero_si512();
    }
#pragma GCC unroll 8
    for (int g = 0; g < P::kG; g += 2)
#pragma GCC unroll 4
      for (int c = 0; c < NC; c++) {
        const int8_t* xg = xq + c * ldq + j * P::kSub + 4 * g;
        ai[c] = _mm512_dpbusd_epi32(ai[c], un.u[s][g], _mm512_set1_epi32(load_i32(xg)));
        bi[c] = _mm512_dpbusd_epi32(bi[c], un.u[s][g + 1], _mm512_set1_epi32(load_i32(xg + 4)));
      }
#pragma GCC unroll 4
    for (int c = 0; c < NC; c++) {
      const __m512i dot = _mm512_add_epi32(ai[c], bi[c]);
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(xs[c * ldxs + j].d));
      acc[c] = _mm512_fmadd_ps(v, st.scale[j0b + s], acc[c]);
      if (P::kMin) acc[c] = _mm512_fmadd_ps(st.min[j0b + s], _mm512_set1_ps(xs[c * ldxs + j].s), acc[c]);
    }
  }
}

// NP panels at once (rows.p + 16 p * stride): independent dependency chains for the out-of-order core.
template <class P, int NC, int NP>
__attribute__((noinline)) void gemm_small_panel(const PanelRows& rows, int64_t nblk, const int8_t* xq, int64_t ldq,
                                                const XSub* xs, int64_t ldxs, float* y, int64_t ldy, int64_t row0,
                                                int64_t nrows) {
  __m512 acc[NP][NC];
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc[p][c] = _mm512_setzero_ps();
  PanelRows pr[NP];
  for (int p = 0; p < NP; p++) pr[p] = PanelRows{rows.p + kPanel * p * rows.stride, rows.stride};
  // Sixteen row streams advancing a few bytes per step defeat the hardware prefetchers: fetch the next
  // panels (the following rows, contiguous in a dense tensor) while these run.
  const uint8_t* next = rows.p + NP * kPanel * rows.stride;
  const int64_t next_lines = NP * kPanel * rows.stride / 64;
  const int64_t lines_per_block = (next_lines + nblk - 1) / nblk;
  for (int64_t b = 0; b < nblk; b++) {
    for (int64_t l = b * lines_per_block; l < std::min(next_lines, (b + 1) * lines_per_block); l++)
      _mm_prefetch(reinterpret_cast<const char*>(next + 64 * l), _MM_HINT_T0);
#pragma GCC unroll 2
    for (int p = 0; p < NP; p++) {
      typename P::State st;
      P::begin(pr[p], b * P::kBytes, st);
#pragma GCC unroll 8
      for (int unit = 0; unit < kUnits<P>; unit++) {
        UnitOf<P> un;
        P::unpack(pr[p], b * P::kBytes, unit, st, un);
        dot_unit<P, NC>(un, st, unit * P::kSubsPerUnit, (b * kUnits<P> + unit) * P::kSubsPerUnit, xq, ldq, xs, ldxs,
                        acc[p]);
      }
    }
  }
  for (int p = 0; p < NP; p++) store_panel<NC>(acc[p], y, ldy, row0 + kPanel * p, nrows - kPanel * p);
}

template <class P, int NC>
void gemm_small(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, float* y, int64_t ldy) {
  thread_local ScratchBuffer tail;
  const int64_t nblk = w.cols / P::kBlock;
  const int8_t* xq = x.q + m0 * x.ldq;
  const XSub* xs = x.sub + m0 * x.ldsub;
  int64_t rp = r0;
  for (; rp + 2 * kPanel <= r1; rp += 2 * kPanel)
    gemm_small_panel<P, NC, 2>(panel_at<P>(w, rp, r1, tail), nblk, xq, x.ldq, xs, x.ldsub, y + m0 * ldy, ldy, rp,
                               2 * kPanel);
  for (; rp < r1; rp += kPanel)
    gemm_small_panel<P, NC, 1>(panel_at<P>(w, rp, r1, tail), nblk, xq, x.ldq, xs, x.ldsub, y + m0 * ldy, ldy, rp,
                               std::min<int64_t>(kPanel, r1 - rp));
}

// ---------------------------------------------------------------------------------------------------
// Prefill (many activation rows): pack whole panels into a buffer, then stream activation rows over
// them. Packed layout, per sub-block of 4G elements:
//   G x 64 bytes  the unit's u vectors
//   16 floats     scales
//   16 floats     mins (types with a min only)

template <int G, bool MIN>
constexpr int kSubBytes = G * 64 + (MIN ? 128 : 64);

template <class P>
__attribute__((noinline)) void pack_panel(const PanelRows& rows, int64_t nblk, uint8_t* dst) {
  for (int64_t b = 0; b < nblk; b++) {
    typename P::State st;
    P::begin(rows, b * P::kBytes, st);
    for (int unit = 0; unit < kUnits<P>; unit++) {
      UnitOf<P> un;
      P::unpack(rows, b * P::kBytes, unit, st, un);
      for (int s = 0; s < P::kSubsPerUnit; s++, dst += kSubBytes<P::kG, P::kMin>) {
        for (int g = 0; g < P::kG; g++) _mm512_store_si512(dst + 64 * g, un.u[s][g]);
        _mm512_store_ps(dst + 64 * P::kG, st.scale[unit * P::kSubsPerUnit + s]);
        if (P::kMin) _mm512_store_ps(dst + 64 * P::kG + 64, st.min[unit * P::kSubsPerUnit + s]);
      }
    }
  }
}

// Register tile: NP packed panels (panel p at pan + p * pstride) x NC activation rows (row c's values
// at xq + c * ldq, its sub-block entries at xs + c * ldxs) over nsub sub-blocks.
template <int G, bool MIN, int NP, int NC>
PE_INLINE void tile(const uint8_t* pan, int64_t pstride, int64_t nsub, const int8_t* xq, int64_t ldq, const XSub* xs,
                    int64_t ldxs, __m512 (&acc)[NP][NC]) {
  for (int64_t j = 0; j < nsub; j++, pan += kSubBytes<G, MIN>, xq += 4 * G, xs++) {
    __m512i ai[NP][NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) {
      const __m512i bias = _mm512_set1_epi32(xs[c * ldxs].bias);
#pragma GCC unroll 4
      for (int p = 0; p < NP; p++) ai[p][c] = bias;
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
      __m512i wv[NP];
#pragma GCC unroll 4
      for (int p = 0; p < NP; p++) wv[p] = _mm512_load_si512(pan + p * pstride + 64 * g);
#pragma GCC unroll 8
      for (int c = 0; c < NC; c++) {
        const __m512i xb = _mm512_set1_epi32(load_i32(xq + c * ldq + 4 * g));
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) ai[p][c] = _mm512_dpbusd_epi32(ai[p][c], wv[p], xb);
      }
    }
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++) {
      const __m512 sc = _mm512_load_ps(pan + p * pstride + 64 * G);
#pragma GCC unroll 8
      for (int c = 0; c < NC; c++) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(ai[p][c]), _mm512_set1_ps(xs[c * ldxs].d));
        acc[p][c] = _mm512_fmadd_ps(v, sc, acc[p][c]);
      }
      if (MIN) {
        const __m512 mn = _mm512_load_ps(pan + p * pstride + 64 * G + 64);
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) acc[p][c] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[c * ldxs].s), acc[p][c]);
      }
    }
  }
}

template <int G, bool MIN, int NP, int NC>
void run_tile(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x, int64_t c0, float* y,
              int64_t ldy, int64_t rp, int64_t nrows) {
  __m512 acc[NP][NC];
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc[p][c] = _mm512_setzero_ps();
  tile<G, MIN, NP, NC>(pan, pstride, nsub, x.q + c0 * x.ldq, x.ldq, x.sub + c0 * x.ldsub, x.ldsub, acc);
  for (int p = 0; p < NP && nrows - kPanel * p > 0; p++)
    store_panel<NC>(acc[p], y + c0 * ldy, ldy, rp + kPanel * p, nrows - kPanel * p);
}

template <int G, bool MIN, int NP>
__attribute__((noinline)) void run_tiles(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x,
                                         int64_t m0, int64_t m1, float* y, int64_t ldy, int64_t rp, int64_t nrows) {
  int64_t c = m0;
  for (; c + kTileM <= m1; c += kTileM) run_tile<G, MIN, NP, kTileM>(pan, pstride, nsub, x, c, y, ldy, rp, nrows);
  switch (m1 - c) {
    case 1: run_tile<G, MIN, NP, 1>(pan, pstride, nsub, x, c, y, ldy, rp, nrows); break;
    case 2: run_tile<G, MIN, NP, 2>(pan, pstride, nsub, x, c, y, ldy, rp, nrows); break;
    case 3: run_tile<G, MIN, NP, 3>(pan, pstride, nsub, x, c, y, ldy, rp, nrows); break;
    case 4: run_tile<G, MIN, NP, 4>(pan, pstride, nsub, x, c, y, ldy, rp, nrows); break;
    case 5: run_tile<G, MIN, NP, 5>(pan, pstride, nsub, x, c, y, ldy, rp, nrows); break;
    default: break;
  }
  static_assert(kTileM == 6, "run_tiles' switch covers the tails of kTileM");
}

template <class P>
void gemm_large(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  constexpr int G = P::kG;
  const int64_t nblk = w.cols / P::kBlock;
  const int64_t nsub = w.cols / P::kSub;
  const int64_t pstride = nsub * kSubBytes<G, P::kMin>;
  thread_local ScratchBuffer packed, tail;
  auto* buf = static_cast<uint8_t*>(packed.get(size_t(2 * pstride)));
  for (int64_t rp = r0; rp < r1; rp += 2 * kPanel) {
    const int np = r1 - rp > kPanel ? 2 : 1;
    for (int p = 0; p < np; p++) pack_panel<P>(panel_at<P>(w, rp + kPanel * p, r1, tail), nblk, buf + p * pstride);
    if (np == 2) run_tiles<G, P::kMin, 2>(buf, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
    else run_tiles<G, P::kMin, 1>(buf, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
  }
}

template <class P>
void gemm_type(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
               int64_t ldy) {
  switch (m1 - m0) {
    case 1: return gemm_small<P, 1>(w, x, r0, r1, m0, y, ldy);
    case 2: return gemm_small<P, 2>(w, x, r0, r1, m0, y, ldy);
    case 3: return gemm_small<P, 3>(w, x, r0, r1, m0, y, ldy);
    default: return gemm_large<P>(w, x, r0, r1, m0, m1, y, ldy);
  }
  static_assert(kMaxSmallM == 3, "gemm_type's switch covers 1..kMaxSmallM");
}

void gemm_quant(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  switch (w.type) {
    case GGMLType::Q4_0: return gemm_type<PackQ4_0>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q4_1: return gemm_type<PackQ4_1>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q5_0: return gemm_type<PackQ5<false>>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q5_1: return gemm_type<PackQ5<true>>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q8_0: return gemm_type<PackQ8_0>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q2_K: return gemm_type<PackQ2_K>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q3_K: return gemm_type<PackQ3_K>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q4_K: return gemm_type<PackQ4_K>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q5_K: return gemm_type<PackQ5_K>(w, x, r0, r1, m0, m1, y, ldy);
    case GGMLType::Q6_K: return gemm_type<PackQ6_K>(w, x, r0, r1, m0, m1, y, ldy);
    default: return;
  }
}

// ---------------------------------------------------------------------------------------------------
// Float weights: an R x C tile of dot products, vectorized along k, reduced once at the end.

template <GGMLType T>
PE_INLINE __m512 load_w16(const uint8_t* row, int64_t i) {
  if constexpr (T == GGMLType::F32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + i);
  } else if constexpr (T == GGMLType::F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i)));
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <GGMLType T>
PE_INLINE __m512 load_w16_tail(const uint8_t* row, int64_t i, __mmask16 m) {
  if constexpr (T == GGMLType::F32) {
    return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(row) + i);
  } else if constexpr (T == GGMLType::F16) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, row + 2 * i));
  } else {
    const __m256i h = _mm256_maskz_loadu_epi16(m, row + 2 * i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <GGMLType T, int R, int C>
void float_tile(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t c0, float* y, int64_t ldy) {
  const int64_t k = w.cols;
  const uint8_t* rows[R];
  for (int i = 0; i < R; i++) rows[i] = static_cast<const uint8_t*>(w.data) + (r + i) * int64_t(w.row_stride);
  __m512 acc[R][C];
  for (int i = 0; i < R; i++)
    for (int c = 0; c < C; c++) acc[i][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int a = 0; a < R; a++) wv[a] = load_w16<T>(rows[a], i);
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      const __m512 xv = _mm512_loadu_ps(x + (c0 + c) * ldx + i);
#pragma GCC unroll 8
      for (int a = 0; a < R; a++) acc[a][c] = _mm512_fmadd_ps(wv[a], xv, acc[a][c]);
    }
  }
  if (i < k) {
    const __mmask16 m = __mmask16((1u << (k - i)) - 1);
    __m512 wv[R];
    for (int a = 0; a < R; a++) wv[a] = load_w16_tail<T>(rows[a], i, m);
    for (int c = 0; c < C; c++) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + (c0 + c) * ldx + i);
      for (int a = 0; a < R; a++) acc[a][c] = _mm512_fmadd_ps(wv[a], xv, acc[a][c]);
    }
  }
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) y[(c0 + c) * ldy + r + a] = _mm512_reduce_add_ps(acc[a][c]);
}

template <GGMLType T, int R>
void float_rows(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  int64_t c = m0;
  for (; c + 6 <= m1; c += 6) float_tile<T, R, 6>(w, x, ldx, r, c, y, ldy);
  switch (m1 - c) {
    case 1: float_tile<T, R, 1>(w, x, ldx, r, c, y, ldy); break;
    case 2: float_tile<T, R, 2>(w, x, ldx, r, c, y, ldy); break;
    case 3: float_tile<T, R, 3>(w, x, ldx, r, c, y, ldy); break;
    case 4: float_tile<T, R, 4>(w, x, ldx, r, c, y, ldy); break;
    case 5: float_tile<T, R, 5>(w, x, ldx, r, c, y, ldy); break;
    default: break;
  }
}

// Many activation rows: transpose 16 weight rows to floats, k-major (dst[16k + i] = W[rp + i][k]), and
// accumulate outer products: one weight vector load feeds kFloatTileM broadcast FMAs, and no horizontal
// sums are needed.
constexpr int kFloatTileM = 12;
constexpr int kFloatPanelMinM = 16;

// In-register 16 x 16 transpose of floats: r[i][k] -> r[k][i].
PE_INLINE void transpose16x16(__m512 r[16]) {
  __m512 u[16];
  for (int q = 0; q < 4; q++) {
    const __m512 t0 = _mm512_unpacklo_ps(r[4 * q], r[4 * q + 1]), t1 = _mm512_unpackhi_ps(r[4 * q], r[4 * q + 1]);
    const __m512 t2 = _mm512_unpacklo_ps(r[4 * q + 2], r[4 * q + 3]);
    const __m512 t3 = _mm512_unpackhi_ps(r[4 * q + 2], r[4 * q + 3]);
    u[4 * q] = _mm512_shuffle_ps(t0, t2, 0x44);      // column 4L of rows 4q..4q+3, in lane L
    u[4 * q + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);  // column 4L + 1
    u[4 * q + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
    u[4 * q + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);
  }
  for (int j = 0; j < 4; j++) {  // 4 x 4 transpose of 128-bit lanes of u[j], u[4 + j], u[8 + j], u[12 + j]
    const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x44), v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xEE);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x44);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xEE);
    r[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[8 + j] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + j] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

template <GGMLType T>
__attribute__((noinline)) void pack_float_panel(const WeightView& w, int64_t rp, int64_t r1, float* dst) {
  const int64_t k = w.cols;
  const uint8_t* rows[kPanel];
  for (int i = 0; i < kPanel; i++)
    rows[i] = static_cast<const uint8_t*>(w.data) + std::min(rp + i, r1 - 1) * int64_t(w.row_stride);
  for (int64_t j = 0; j < k; j += 16) {
    const int64_t n = std::min<int64_t>(16, k - j);
    const __mmask16 m = __mmask16((1u << n) - 1);
    __m512 r[16];
    for (int i = 0; i < kPanel; i++) r[i] = n == 16 ? load_w16<T>(rows[i], j) : load_w16_tail<T>(rows[i], j, m);
    transpose16x16(r);
    for (int c = 0; c < n; c++) _mm512_store_ps(dst + (j + c) * kPanel, r[c]);
  }
}

template <int NC>
void float_panel_tile(const float* pan, int64_t k, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t rp,
                      int64_t nrows) {
  __m512 acc[NC];
  for (int c = 0; c < NC; c++) acc[c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < k; j++) {
    const __m512 wv = _mm512_load_ps(pan + j * kPanel);
#pragma GCC unroll 12
    for (int c = 0; c < NC; c++) acc[c] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[c * ldx + j]), acc[c]);
  }
  store_panel<NC>(acc, y, ldy, rp, nrows);
}

__attribute__((noinline)) void float_panel_tiles(const float* pan, int64_t k, const float* x, int64_t ldx, int64_t m0,
                                                 int64_t m1, float* y, int64_t ldy, int64_t rp, int64_t nrows) {
  int64_t c = m0;
  for (; c + kFloatTileM <= m1; c += kFloatTileM)
    float_panel_tile<kFloatTileM>(pan, k, x + c * ldx, ldx, y + c * ldy, ldy, rp, nrows);
  const int64_t left = m1 - c;
  const float* xc = x + c * ldx;
  float* yc = y + c * ldy;
  if (left >= 8) {
    float_panel_tile<8>(pan, k, xc, ldx, yc, ldy, rp, nrows);
    xc += 8 * ldx, yc += 8 * ldy;
  }
  switch (left % 8) {
    case 1: float_panel_tile<1>(pan, k, xc, ldx, yc, ldy, rp, nrows); break;
    case 2: float_panel_tile<2>(pan, k, xc, ldx, yc, ldy, rp, nrows); break;
    case 3: float_panel_tile<3>(pan, k, xc, ldx, yc, ldy, rp, nrows); break;
    case 4: float_panel_tile<4>(pan, k, xc, ldx, yc, ldy, rp, nrows); break;
    case 5: float_panel_tile<5>(pan, k, xc, ldx, yc, ldy, rp, nrows); break;
    case 6: float_panel_tile<6>(pan, k, xc, ldx, yc, ldy, rp, nrows); break;
    case 7: float_panel_tile<7>(pan, k, xc, ldx, yc, ldy, rp, nrows); break;
    default: break;
  }
  static_assert(kFloatTileM == 12, "float_panel_tiles covers the tails of kFloatTileM");
}

template <GGMLType T>
void gemm_float_type(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                     float* y, int64_t ldy) {
  if (m1 - m0 >= kFloatPanelMinM) {
    thread_local ScratchBuffer panel;
    auto* pan = static_cast<float*>(panel.get(size_t(w.cols) * kPanel * sizeof(float)));
    for (int64_t rp = r0; rp < r1; rp += kPanel) {
      pack_float_panel<T>(w, rp, r1, pan);
      float_panel_tiles(pan, w.cols, x, ldx, m0, m1, y, ldy, rp, std::min<int64_t>(kPanel, r1 - rp));
    }
    return;
  }
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) float_rows<T, 4>(w, x, ldx, r, m0, m1, y, ldy);
  for (; r < r1; r++) float_rows<T, 1>(w, x, ldx, r, m0, m1, y, ldy);
}

void gemm_float(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                float* y, int64_t ldy) {
  switch (w.type) {
    case GGMLType::F32: return gemm_float_type<GGMLType::F32>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    case GGMLType::F16: return gemm_float_type<GGMLType::F16>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    case GGMLType::BF16: return gemm_float_type<GGMLType::BF16>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    default: return;
  }
}

}  // namespace

const MatmulKernels kAvx512Kernels = {quantize_x, gemm_quant, gemm_float};

}  // namespace pe::cpu
