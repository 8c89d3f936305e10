// AVX2 matmul kernels (AVX2, FMA, F16C). Compiled with those ISA flags; called only when cpu_path() is
// AVX2 (or from nowhere on CPUs without it).
//
// Same scheme as the AVX-512 kernels (see matmul_avx512.cpp) with 8-row panels: one ymm holds 4
// consecutive u bytes of each of 8 weight rows, and a broadcast of 4 activation bytes multiplies all
// eight at once. Without VNNI the byte products go through pmaddubsw (u8 x s8 -> pairs summed to s16,
// saturating) and pmaddwd: partial sums stay in int16 for as many groups as the type's largest u allows
// without overflow, so small-u types pay one pmaddwd per sub-block. Q8_0 (u up to 255 would saturate)
// keeps signed weights and uses the sign trick, which needs activations != -128 (guaranteed by
// quantize_x).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/matmul_kernels.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu {

namespace {

constexpr int kPanel = 8;      // weight rows per panel: one int32 lane each
constexpr int kMaxSmallM = 3;  // up to this many activation rows, unpack and use at once
constexpr int kTileM = 4;      // activation rows per register tile over packed panels

PE_INLINE int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

PE_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

PE_INLINE int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// ---------------------------------------------------------------------------------------------------
// Activation quantization, as the portable path (round-half-even through cvtps2dq).

void quantize_x(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k, const QuantScheme& s,
                const QuantizedX& out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t r = m0; r < m1; r++) {
    const float* xr = x + r * ldx;
    int8_t* q = out.q + r * out.ldq;
    XSub* sub = out.sub + r * out.ldsub;
    for (int64_t b = 0; b < k / 32; b++) {
      __m256 v[4];
      for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xr + 32 * b + 8 * i);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], abs_mask), _mm256_and_ps(v[1], abs_mask)),
                                _mm256_max_ps(_mm256_and_ps(v[2], abs_mask), _mm256_and_ps(v[3], abs_mask)));
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float amax = _mm_cvtss_f32(m4);
      const float d = amax / 127.0f;
      const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
      const __m256 vid = _mm256_set1_ps(id);
      __m256i qi[4];
      for (int i = 0; i < 4; i++) qi[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vid));
      // Pack 32 int32 to 32 int8 in order (packs interleave 128-bit lanes; the permute undoes it).
      const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
      const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), p8);
      const int s0 = hsum_i32(_mm256_add_epi32(qi[0], qi[1])), s1 = hsum_i32(_mm256_add_epi32(qi[2], qi[3]));
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
// Weight unpacking into 8-row units (see matmul_avx512.cpp for the scheme).

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

// A packer describes one type (see matmul_avx512.cpp): begin() decodes what a block's units share
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

// K-quants: layouts as documented in matmul_avx512.cpp's packers.
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

template <class P>
PanelRows panel_at(const WeightView& w, int64_t rp, int64_t r1, ScratchBuffer& tail) {
  const auto* base = static_cast<const uint8_t*>(w.data);
  if (r1 - rp >= kPanel) return PanelRows{base + rp * int64_t(w.row_stride), int64_t(w.row_stride)};
  const int64_t rb = w.cols / P::kBlock * P::kBytes;
  auto* d = static_cast<uint8_t*>(tail.get(size_t(kPanel * rb)));
  for (int i = 0; i < kPanel; i++) std::memcpy(d + i * rb, base + std::min(rp + i, r1 - 1) * int64_t(w.row_stride), rb);
  return PanelRows{d, rb};
}

template <int NC>
PE_INLINE void store_panel(const __m256 (&acc)[NC], float* y, int64_t ldy, int64_t row0, int64_t nrows) {
  for (int c = 0; c < NC; c++) {
    float* dst = y + c * ldy + row0;
    if (nrows >= kPanel) {
      _mm256_storeu_ps(dst, acc[c]);
    } else {
      alignas(32) float tmp[kPanel];
      _mm256_store_ps(tmp, acc[c]);
      std::memcpy(dst, tmp, size_t(nrows) * sizeof(float));
    }
  }
}

// Dot products of one sub-block's G weight vectors with NC activation rows: returns float partials
// (before the scale) in v[c].
template <int G, int GS, bool SIGNED, int NC>
PE_INLINE void dot_sub(const __m256i* w, const int8_t* xq, int64_t ldq, const XSub* xs, int64_t ldxs,
                       __m256 (&v)[NC]) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[NC];
#pragma GCC unroll 4
  for (int c = 0; c < NC; c++) acc[c] = SIGNED ? _mm256_setzero_si256() : _mm256_set1_epi32(xs[c * ldxs].bias);
#pragma GCC unroll 8
  for (int g0 = 0; g0 < G; g0 += GS) {
    __m256i s16[NC];
    for (int g = g0; g < g0 + GS && g < G; g++) {
      const __m256i wabs = SIGNED ? _mm256_sign_epi8(w[g], w[g]) : w[g];
#pragma GCC unroll 4
      for (int c = 0; c < NC; c++) {
        __m256i xb = _mm256_set1_epi32(load_i32(xq + c * ldq + 4 * g));
        if (SIGNED) xb = _mm256_sign_epi8(xb, w[g]);
        const __m256i p = _mm256_maddubs_epi16(wabs, xb);
        s16[c] = g == g0 ? p : _mm256_add_epi16(s16[c], p);
      }
    }
#pragma GCC unroll 4
    for (int c = 0; c < NC; c++) acc[c] = _mm256_add_epi32(acc[c], _mm256_madd_epi16(s16[c], ones));
  }
#pragma GCC unroll 4
  for (int c = 0; c < NC; c++) v[c] = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[c]), _mm256_set1_ps(xs[c * ldxs].d));
}

// ---------------------------------------------------------------------------------------------------
// Decode: unpack each unit of a panel into registers and use it at once.

template <class P, int NC>
__attribute__((noinline)) void gemm_small_panel(const PanelRows& rows, int64_t nblk, const int8_t* xq, int64_t ldq,
                                                const XSub* xs, int64_t ldxs, float* y, int64_t ldy, int64_t row0,
                                                int64_t nrows) {
  __m256 acc[NC];
  for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nblk; b++) {
    typename P::State st;
    P::begin(rows, b * P::kBytes, st);
#pragma GCC unroll 8
    for (int unit = 0; unit < kUnits<P>; unit++) {
      UnitOf<P> un;
      P::unpack(rows, b * P::kBytes, unit, st, un);
#pragma GCC unroll 8
      for (int s = 0; s < P::kSubsPerUnit; s++) {
        const int sb = unit * P::kSubsPerUnit + s;
        const int64_t j = b * (P::kBlock / P::kSub) + sb;
        __m256 v[NC];
        dot_sub<P::kG, P::kGS, P::kSigned, NC>(un.u[s], xq + j * P::kSub, ldq, xs + j, ldxs, v);
        for (int c = 0; c < NC; c++) {
          acc[c] = _mm256_fmadd_ps(v[c], st.scale[sb], acc[c]);
          if (P::kMin) acc[c] = _mm256_fmadd_ps(st.min[sb], _mm256_set1_ps(xs[c * ldxs + j].s), acc[c]);
        }
      }
    }
  }
  store_panel<NC>(acc, y, ldy, row0, nrows);
}

template <class P, int NC>
void gemm_small(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, float* y, int64_t ldy) {
  thread_local ScratchBuffer tail;
  const int64_t nblk = w.cols / P::kBlock;
  for (int64_t rp = r0; rp < r1; rp += kPanel)
    gemm_small_panel<P, NC>(panel_at<P>(w, rp, r1, tail), nblk, x.q + m0 * x.ldq, x.ldq, x.sub + m0 * x.ldsub,
                            x.ldsub, y + m0 * ldy, ldy, rp, std::min<int64_t>(kPanel, r1 - rp));
}

// ---------------------------------------------------------------------------------------------------
// Prefill: pack whole panels (per sub-block: G x 32 bytes of u, 8 float scales, 8 float mins if any),
// then stream activation rows over them.

template <int G, bool MIN>
constexpr int kSubBytes = G * 32 + (MIN ? 64 : 32);

template <class P>
__attribute__((noinline)) void pack_panel(const PanelRows& rows, int64_t nblk, uint8_t* dst) {
  for (int64_t b = 0; b < nblk; b++) {
    typename P::State st;
    P::begin(rows, b * P::kBytes, st);
    for (int unit = 0; unit < kUnits<P>; unit++) {
      UnitOf<P> un;
      P::unpack(rows, b * P::kBytes, unit, st, un);
      for (int s = 0; s < P::kSubsPerUnit; s++, dst += kSubBytes<P::kG, P::kMin>) {
        const int sb = unit * P::kSubsPerUnit + s;
        for (int g = 0; g < P::kG; g++) _mm256_store_si256(reinterpret_cast<__m256i*>(dst + 32 * g), un.u[s][g]);
        _mm256_store_ps(reinterpret_cast<float*>(dst + 32 * P::kG), st.scale[sb]);
        if (P::kMin) _mm256_store_ps(reinterpret_cast<float*>(dst + 32 * P::kG + 32), st.min[sb]);
      }
    }
  }
}

template <int G, int GS, bool MIN, bool SIGNED, int NC>
void run_tile(const uint8_t* pan, int64_t nsub, const QuantizedX& x, int64_t c0, float* y, int64_t ldy, int64_t rp,
              int64_t nrows) {
  __m256 acc[NC];
  for (int c = 0; c < NC; c++) acc[c] = _mm256_setzero_ps();
  const int8_t* xq = x.q + c0 * x.ldq;
  const XSub* xs = x.sub + c0 * x.ldsub;
  for (int64_t j = 0; j < nsub; j++, pan += kSubBytes<G, MIN>, xq += 4 * G, xs++) {
    __m256i w[G];
    for (int g = 0; g < G; g++) w[g] = _mm256_load_si256(reinterpret_cast<const __m256i*>(pan + 32 * g));
    __m256 v[NC];
    dot_sub<G, GS, SIGNED, NC>(w, xq, x.ldq, xs, x.ldsub, v);
    const __m256 sc = _mm256_load_ps(reinterpret_cast<const float*>(pan + 32 * G));
    for (int c = 0; c < NC; c++) acc[c] = _mm256_fmadd_ps(v[c], sc, acc[c]);
    if (MIN) {
      const __m256 mn = _mm256_load_ps(reinterpret_cast<const float*>(pan + 32 * G + 32));
      for (int c = 0; c < NC; c++) acc[c] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[c * x.ldsub].s), acc[c]);
    }
  }
  store_panel<NC>(acc, y + c0 * ldy, ldy, rp, nrows);
}

template <int G, int GS, bool MIN, bool SIGNED>
__attribute__((noinline)) void run_tiles(const uint8_t* pan, int64_t nsub, const QuantizedX& x, int64_t m0,
                                         int64_t m1, float* y, int64_t ldy, int64_t rp, int64_t nrows) {
  int64_t c = m0;
  for (; c + kTileM <= m1; c += kTileM) run_tile<G, GS, MIN, SIGNED, kTileM>(pan, nsub, x, c, y, ldy, rp, nrows);
  switch (m1 - c) {
    case 1: run_tile<G, GS, MIN, SIGNED, 1>(pan, nsub, x, c, y, ldy, rp, nrows); break;
    case 2: run_tile<G, GS, MIN, SIGNED, 2>(pan, nsub, x, c, y, ldy, rp, nrows); break;
    case 3: run_tile<G, GS, MIN, SIGNED, 3>(pan, nsub, x, c, y, ldy, rp, nrows); break;
    default: break;
  }
  static_assert(kTileM == 4, "run_tiles' switch covers the tails of kTileM");
}

template <class P>
void gemm_large(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  const int64_t nblk = w.cols / P::kBlock;
  const int64_t nsub = w.cols / P::kSub;
  thread_local ScratchBuffer packed, tail;
  auto* buf = static_cast<uint8_t*>(packed.get(size_t(nsub * kSubBytes<P::kG, P::kMin>)));
  for (int64_t rp = r0; rp < r1; rp += kPanel) {
    pack_panel<P>(panel_at<P>(w, rp, r1, tail), nblk, buf);
    run_tiles<P::kG, P::kGS, P::kMin, P::kSigned>(buf, nsub, x, m0, m1, y, ldy, rp,
                                                  std::min<int64_t>(kPanel, r1 - rp));
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
// Float weights: an R x C tile of dot products vectorized along k, reduced at the end.

template <GGMLType T>
PE_INLINE __m256 load_w8(const uint8_t* row, int64_t i) {
  if constexpr (T == GGMLType::F32) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + i);
  } else if constexpr (T == GGMLType::F16) {
    return _mm256_cvtph_ps(load128(row + 2 * i));
  } else {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load128(row + 2 * i)), 16));
  }
}

template <GGMLType T>
PE_INLINE float w_scalar(const uint8_t* row, int64_t i) {
  if constexpr (T == GGMLType::F32) {
    float f;
    std::memcpy(&f, row + 4 * i, 4);
    return f;
  } else if constexpr (T == GGMLType::F16) {
    return _cvtsh_ss(uint16_t(load_u16(row + 2 * i)));
  } else {
    return bf16_to_fp32(uint16_t(load_u16(row + 2 * i)));
  }
}

template <GGMLType T, int R, int C>
void float_tile(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t c0, float* y, int64_t ldy) {
  const int64_t k = w.cols;
  const uint8_t* rows[R];
  for (int a = 0; a < R; a++) rows[a] = static_cast<const uint8_t*>(w.data) + (r + a) * int64_t(w.row_stride);
  __m256 acc[R][C];
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) acc[a][c] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    __m256 wv[R];
#pragma GCC unroll 8
    for (int a = 0; a < R; a++) wv[a] = load_w8<T>(rows[a], i);
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      const __m256 xv = _mm256_loadu_ps(x + (c0 + c) * ldx + i);
#pragma GCC unroll 8
      for (int a = 0; a < R; a++) acc[a][c] = _mm256_fmadd_ps(wv[a], xv, acc[a][c]);
    }
  }
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) {
      float tail = 0.0f;
      for (int64_t t = i; t < k; t++) tail += w_scalar<T>(rows[a], t) * x[(c0 + c) * ldx + t];
      y[(c0 + c) * ldy + r + a] = hsum(acc[a][c]) + tail;
    }
}

template <GGMLType T, int R>
void float_rows(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  int64_t c = m0;
  for (; c + 2 <= m1; c += 2) float_tile<T, R, 2>(w, x, ldx, r, c, y, ldy);
  if (c < m1) float_tile<T, R, 1>(w, x, ldx, r, c, y, ldy);
}

template <GGMLType T>
void gemm_float_type(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                     float* y, int64_t ldy) {
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

const MatmulKernels kAvx2Kernels = {quantize_x, gemm_quant, gemm_float};

}  // namespace pe::cpu
