// Weight unpacking for the SIMD matmul kernels, written once over a vector-traits type V (see
// matmul_simd.h for what V provides): V::kRows rows of a block of any quantized type to vectors of u
// bytes (see quant_blocks.h), one int32 lane per row. Included by matmul_simd.h only, so it is compiled
// once per ISA with that file's flags; everything here has internal linkage, so the linker cannot
// swap one ISA's copy for another's.
#pragma once
#include <algorithm>
#include <cstring>

#include "cpu/matmul_kernels.h"

namespace pe::cpu {
namespace {

// V::kRows weight rows `stride` bytes apart, as the file stores them.
struct PanelRows {
  const uint8_t* p;
  int64_t stride;
  PE_INLINE const uint8_t* at(int i, int64_t off) const { return p + i * stride + off; }
};

// A panel in the panel layout (cpu/panels.h), from its first byte; stride is the row bytes, so that
// the next panel starts at p + kRows * stride, as with PanelRows.
struct PackedPanel {
  const uint8_t* p;
  int64_t stride;
};

// What the packers read, from either layout: lane i of t[g] = the 4-byte word at off + 4g of row i
// (g < 4); the fp16 at off of each row, as float; the 4-byte word at off of each row. From rows as
// stored this is a transpose per vector; from a packed panel, one load.
template <class V>
PE_INLINE void load_words(const PanelRows& r, int64_t off, typename V::I t[4]) { V::load_transpose(r, off, t); }
template <class V>
PE_INLINE void load_words(const PackedPanel& r, int64_t off, typename V::I t[4]) {
  for (int g = 0; g < 4; g++) t[g] = V::loadu_i(r.p + V::kRows * (off + 4 * g));
}
template <class V>
PE_INLINE typename V::F load_scales(const PanelRows& r, int64_t off) { return V::load_f16(r, off); }
template <class V>
PE_INLINE typename V::F load_scales(const PackedPanel& r, int64_t off) { return V::cvt_f16(r.p + V::kRows * off); }
template <class V>
PE_INLINE typename V::I load_word(const PanelRows& r, int64_t off) { return V::load_u32(r, off); }
template <class V>
PE_INLINE typename V::I load_word(const PackedPanel& r, int64_t off) { return V::loadu_i(r.p + V::kRows * off); }

template <class V, int S, int G>
struct Unit {
  typename V::I u[S][G];
};

template <class V, int NSUB>
struct ScaleState {
  typename V::F scale[NSUB];
  typename V::F min[NSUB];
};

// Q4_0-style nibbles: groups 0..3 are the low nibbles of bytes 0..15, groups 4..7 the high ones.
template <class V>
PE_INLINE void nibble_groups(const typename V::I t[4], typename V::I out[8]) {
  const auto m4 = V::set1_i8(0x0F);
  for (int g = 0; g < 4; g++) {
    out[g] = V::and_(t[g], m4);
    out[g + 4] = V::and_(V::srli_i16(t[g], 4), m4);
  }
}

// ((v >> shift) & mask) per int32 lane, as float.
template <class V>
PE_INLINE typename V::F field_f(typename V::I v, int shift, int mask) {
  return V::cvt(V::and_(V::srli_i32(v, shift), V::set1_i32(mask)));
}

// A packer describes one type: its QuantScheme S (block geometry, offset, min), sub-blocks of
// kSub = 4 kG elements unpacked kSubsPerUnit at a time. begin() decodes what a block's units share
// (scales, mins, high bits) into a State; unpack() produces one unit's u vectors: per sub-block, kG
// vectors where vector g holds u of elements 4g..4g+3 of row i in int32 lane i.
//
// kSigned: u holds the signed q (Q8_0 on ISAs without vpdpbusd: pmaddubsw's u8 x s8 products of u up to
// 255 would saturate int16, so the kernel uses the sign trick instead and ignores the offset).
template <class V, GGMLType T, int SUBS_PER_UNIT, bool SIGNED = false>
struct PackBase {
  static constexpr GGMLType kType = T;
  static constexpr const QuantScheme& S = *quant_scheme(T);
  static constexpr int kBlock = S.block, kSub = S.sub, kG = S.sub / 4, kSubsPerUnit = SUBS_PER_UNIT;
  static constexpr int kBytes = S.block_bytes;
  static constexpr bool kMin = S.has_min, kSigned = SIGNED;
  // Groups whose pmaddubsw results can be summed in int16: each is at most 2 * max|u| * 127.
  static constexpr int kMaxAbsU = SIGNED ? 128 : S.max_u;
  static constexpr int kGS = std::max(1, std::min(kG, 32767 / (2 * 127 * kMaxAbsU)));
  // Where the fields begin() reads at the end of a block start (kBytes: it reads only the head). Decode
  // asks for that tail of the next block early (gemm_small_panel).
  static constexpr int kTail = kBytes;
  // Whether some sub-blocks' u are a power of two times the true u, with the scale divided by it (see
  // PackQ45_K): the products are the same, but u - offset no longer fits int8.
  static constexpr bool kScaledU = false;
  static_assert(V::kVnni || 2 * 127 * kMaxAbsU <= 32767, "pmaddubsw would saturate: use the signed form");
};

template <class V>
struct PackQ4_0 : PackBase<V, GGMLType::Q4_0, 1> {
  using I = typename V::I;
  using State = ScaleState<V, 1>;
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) { st.scale[0] = load_scales<V>(r, off); }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int, const State&, Unit<V, 1, 8>& out) {
    I t[4];
    load_words<V>(r, off + 2, t);
    nibble_groups<V>(t, out.u[0]);
  }
};

template <class V>
struct PackQ4_1 : PackBase<V, GGMLType::Q4_1, 1> {
  using I = typename V::I;
  using State = ScaleState<V, 1>;
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) {
    st.scale[0] = load_scales<V>(r, off);
    st.min[0] = load_scales<V>(r, off + 2);
  }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int, const State&, Unit<V, 1, 8>& out) {
    I t[4];
    load_words<V>(r, off + 4, t);
    nibble_groups<V>(t, out.u[0]);
  }
};

template <class V, bool Q51>
struct PackQ5 : PackBase<V, Q51 ? GGMLType::Q5_1 : GGMLType::Q5_0, 1> {
  using I = typename V::I;
  using State = ScaleState<V, 1>;
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) {
    st.scale[0] = load_scales<V>(r, off);
    if (Q51) st.min[0] = load_scales<V>(r, off + 2);
  }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int, const State&, Unit<V, 1, 8>& out) {
    constexpr int qh_off = Q51 ? 4 : 2;
    I t[4];
    load_words<V>(r, off + qh_off + 4, t);
    nibble_groups<V>(t, out.u[0]);
    const I qh = load_word<V>(r, off + qh_off);
    for (int g = 0; g < 8; g++) out.u[0][g] = V::add_q5_high_bits(out.u[0][g], qh, g);
  }
};
template <class V>
using PackQ5_0 = PackQ5<V, false>;
template <class V>
using PackQ5_1 = PackQ5<V, true>;

template <class V>
struct PackQ8_0 : PackBase<V, GGMLType::Q8_0, 1, !V::kVnni> {
  using I = typename V::I;
  using State = ScaleState<V, 1>;
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) { st.scale[0] = load_scales<V>(r, off); }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int, const State&, Unit<V, 1, 8>& out) {
    // vpdpbusd: int8 q -> u = q + 128 (the offset); otherwise the signed q as it is.
    const I flip = V::set1_i8(V::kVnni ? 0x80 : 0);
    I t[4];
    load_words<V>(r, off + 2, t);
    for (int g = 0; g < 4; g++) out.u[0][g] = V::kVnni ? V::xor_(t[g], flip) : t[g];
    load_words<V>(r, off + 18, t);
    for (int g = 0; g < 4; g++) out.u[0][g + 4] = V::kVnni ? V::xor_(t[g], flip) : t[g];
  }
};

// Q2_K: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin. Element 128n + 32j + l is
// bits 2j..2j+1 of qs[32n + l]; unit n holds sub-blocks 8n..8n+7 (sub-block 8n + 2j + l / 16).
template <class V>
struct PackQ2_K : PackBase<V, GGMLType::Q2_K, 8> {
  static constexpr int kTail = 80;  // d, dmin
  using I = typename V::I;
  using F = typename V::F;
  using State = ScaleState<V, 16>;
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) {
    const F d = load_scales<V>(r, off + 80), dmin = load_scales<V>(r, off + 82);
    I s[4];
    load_words<V>(r, off, s);
    for (int j = 0; j < 16; j++) {
      st.scale[j] = V::mul(d, field_f<V>(s[j / 4], 8 * (j % 4), 0xF));
      st.min[j] = V::neg(V::mul(dmin, field_f<V>(s[j / 4], 8 * (j % 4) + 4, 0xF)));
    }
  }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int n, const State&, Unit<V, 8, 4>& out) {
    I q[8];
    load_words<V>(r, off + 16 + 32 * n, q);
    load_words<V>(r, off + 32 + 32 * n, q + 4);
    for (int j = 0; j < 4; j++)
      for (int h = 0; h < 2; h++)
        for (int g = 0; g < 4; g++) out.u[2 * j + h][g] = V::bits(q[4 * h + g], 2 * j, 3);
  }
};

// Q3_K: hmask[32], qs[64], scales[12] (16 6-bit values, offset 32), d. Element 128n + 32j + l is bits
// 2j..2j+1 of qs[32n + l] plus 4 * bit (4n + j) of hmask[l]; unit n holds sub-blocks 8n..8n+7.
template <class V>
struct PackQ3_K : PackBase<V, GGMLType::Q3_K, 8> {
  static constexpr int kTail = 92;  // the scales' words, d
  using I = typename V::I;
  using F = typename V::F;
  struct State : ScaleState<V, 16> {
    I hm[8];
  };
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) {
    const F d = load_scales<V>(r, off + 108);
    I s[4];  // bytes 92..107: s[1..3] are the scales (the read stays inside the block)
    load_words<V>(r, off + 92, s);
    for (int j = 0; j < 16; j++) {
      const I lo = V::and_(V::srli_i32(s[1 + (j % 8) / 4], 8 * (j % 4) + 4 * (j / 8)), V::set1_i32(0xF));
      const I hi = V::and_(V::srli_i32(s[3], 8 * (j % 4) + 2 * (j / 4)), V::set1_i32(3));
      const I sc = V::sub_i32(V::or_(lo, V::slli_i32(hi, 4)), V::set1_i32(32));
      st.scale[j] = V::mul(d, V::cvt(sc));
    }
    load_words<V>(r, off, st.hm);
    load_words<V>(r, off + 16, st.hm + 4);
  }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int n, const State& st, Unit<V, 8, 4>& out) {
    I q[8];
    load_words<V>(r, off + 32 + 32 * n, q);
    load_words<V>(r, off + 48 + 32 * n, q + 4);
    for (int j = 0; j < 4; j++)
      for (int h = 0; h < 2; h++)
        for (int g = 0; g < 4; g++) {
          const int b = 4 * n + j;  // hmask bit, moved to bit 2
          out.u[2 * j + h][g] = V::or_bits(V::bits(q[4 * h + g], 2 * j, 3), st.hm[4 * h + g], b - 2, 4);
        }
  }
};

// Q4_K / Q5_K: d, dmin, 12 bytes of 6-bit scales and mins, (Q5_K: qh[32]), qs[128]. Sub-block 2c is the
// low nibbles of qs[32c..32c+32), 2c+1 the high ones; Q5_K's fifth bit of element 32j + l is bit j of
// qh[l]. Unit c holds sub-blocks 2c and 2c+1.
//
// Both steps leave bits where they are and move the power of two into the scale instead, which is exact
// (the products and their rounding do not change, and no value comes near the ends of the float range):
// a scale byte masked in place at byte i of its word is sc * 2^(8i), taken by d * 2^(-8i); with vpdpbusd
// (int32 sums) Q4_K's high nibbles are used as the byte t & 0xF0 = 16 u, taken by scale / 16. That saves
// the shifts of 16 scales and mins and 128 high nibbles per block, a sixth of an AVX-512 decode block's
// vector instructions: one row's Q4_K product from L2 +16 %, eight rows' +4 % on Zen 4 (a model's decode
// from memory moved by -2..+3 %); on the AVX2 path (scales only) eight rows' +12 %.
template <class V, bool Q5>
struct PackQ45_K : PackBase<V, Q5 ? GGMLType::Q5_K : GGMLType::Q4_K, 2> {
  using I = typename V::I;
  using F = typename V::F;
  // Q4_K's high nibbles as 16 u (PackBase::kScaledU); pmaddubsw's int16 pairs would saturate on them.
  static constexpr bool kScaledU = V::kVnni && !Q5;
  struct State : ScaleState<V, 8> {
    I qh[Q5 ? 8 : 1];
  };
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) {
    const F d = load_scales<V>(r, off), dmin = load_scales<V>(r, off + 2);
    I s[4];  // bytes 4..19: s[0..2] are the 12 scale bytes
    load_words<V>(r, off + 4, s);
    // Sub-blocks 0..3 from s[0] (scales) and s[1] (mins); 4..7 take their low nibble from s[2] and their
    // top two bits from bits 6..7 of s[0] and s[1].
    for (int j = 0; j < 8; j++) {
      const int i = j % 4;  // the byte
      if (j == 4) {
        s[0] = V::or_bits(V::and_(s[2], V::set1_i8(0x0F)), s[0], 2, 0x30);
        s[1] = V::or_bits(V::bits(s[2], 4, 0x0F), s[1], 2, 0x30);
      }
      const I field = V::set1_i32(0x3F << (8 * i));
      const I sc = V::and_(s[0], field), m = V::and_(s[1], field);
      const float at = 1.0f / float(1u << (8 * i));  // 2^(-8i)
      st.scale[j] = V::mul(V::mul(d, V::set1_ps(kScaledU && j % 2 ? at / 16 : at)), V::cvt(sc));
      st.min[j] = V::neg(V::mul(V::mul(dmin, V::set1_ps(at)), V::cvt(m)));
    }
    if (Q5) {
      load_words<V>(r, off + 16, st.qh);
      load_words<V>(r, off + 32, st.qh + 4);
    }
  }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int c, const State& st, Unit<V, 2, 8>& out) {
    const int qs = (Q5 ? 48 : 16) + 32 * c;
    I t[8];
    load_words<V>(r, off + qs, t);
    load_words<V>(r, off + qs + 16, t + 4);
    for (int g = 0; g < 8; g++) {
      out.u[0][g] = V::and_(t[g], V::set1_i8(0x0F));
      out.u[1][g] = kScaledU ? V::and_(t[g], V::set1_i8(0xF0)) : V::bits(t[g], 4, 0xF);
      if (Q5) {
        out.u[0][g] = V::or_bits(out.u[0][g], st.qh[g], 2 * c - 4, 0x10);
        out.u[1][g] = V::or_bits(out.u[1][g], st.qh[g], 2 * c + 1 - 4, 0x10);
      }
    }
  }
};
template <class V>
using PackQ4_K = PackQ45_K<V, false>;
template <class V>
using PackQ5_K = PackQ45_K<V, true>;

// Q6_K: ql[128], qh[64], int8 scales[16], d. Element 128n + 64s + t is nibble s of ql[64n + t] plus
// bits 2k..2k+1 of qh[32n + t % 32] (k = 2s + t / 32) times 16. Unit u holds elements 32u..32u+31
// (sub-blocks 2u, 2u+1): n = u / 4, s = u / 2 % 2, t = 32 (u % 2) + l. Units of 32 elements, not 128:
// a 128-element unit's 24 loaded and 32 unpacked vectors spilled the registers (AVX-512 decode of Q6_K
// ran at half the speed of Q4_K per byte).
template <class V>
struct PackQ6_K : PackBase<V, GGMLType::Q6_K, 2> {
  static constexpr int kTail = 192;  // scales, d
  using I = typename V::I;
  using F = typename V::F;
  using State = ScaleState<V, 16>;
  template <class R>
  static PE_INLINE void begin(const R& r, int64_t off, State& st) {
    const F d = load_scales<V>(r, off + 208);
    I s[4];
    load_words<V>(r, off + 192, s);
    for (int j = 0; j < 16; j++) {
      const I sc = V::srai_i32(V::slli_i32(s[j / 4], 24 - 8 * (j % 4)), 24);
      st.scale[j] = V::mul(d, V::cvt(sc));
    }
  }
  template <class R>
  static PE_INLINE void unpack(const R& r, int64_t off, int u, const State&, Unit<V, 2, 4>& out) {
    const int n = u / 4, s = u / 2 % 2, h = u % 2, k = 2 * s + h;
    I ql[8], qh[8];
    for (int i = 0; i < 2; i++) load_words<V>(r, off + 64 * n + 32 * h + 16 * i, ql + 4 * i);
    for (int i = 0; i < 2; i++) load_words<V>(r, off + 128 + 32 * n + 16 * i, qh + 4 * i);
    for (int g = 0; g < 8; g++) out.u[g / 4][g % 4] = V::or_bits(V::bits(ql[g], 4 * s, 0xF), qh[g], 2 * k - 4, 0x30);
  }
};

// Which packer unpacks which type: the one list of types the SIMD kernels handle. Calls
// f(Packer<V>{}) for w's type; returns false for a type without a packer.
template <class V, class Fn>
PE_INLINE bool with_packer(GGMLType t, Fn&& f) {
  switch (t) {
    case GGMLType::Q4_0: f(PackQ4_0<V>{}); return true;
    case GGMLType::Q4_1: f(PackQ4_1<V>{}); return true;
    case GGMLType::Q5_0: f(PackQ5_0<V>{}); return true;
    case GGMLType::Q5_1: f(PackQ5_1<V>{}); return true;
    case GGMLType::Q8_0: f(PackQ8_0<V>{}); return true;
    case GGMLType::Q2_K: f(PackQ2_K<V>{}); return true;
    case GGMLType::Q3_K: f(PackQ3_K<V>{}); return true;
    case GGMLType::Q4_K: f(PackQ4_K<V>{}); return true;
    case GGMLType::Q5_K: f(PackQ5_K<V>{}); return true;
    case GGMLType::Q6_K: f(PackQ6_K<V>{}); return true;
    default: return false;
  }
}

template <class P>
constexpr int kUnits = P::kBlock / (P::kSub * P::kSubsPerUnit);

template <class V, class P>
using UnitOf = Unit<V, P::kSubsPerUnit, P::kG>;

}  // namespace
}  // namespace pe::cpu
