// The quantized matmul kernels, written once over a vector-traits type V and compiled once per ISA:
// matmul_avx2.cpp and matmul_avx512.cpp each define their V and include this file under their own ISA
// flags. Everything here has internal linkage (anonymous namespace), so each file gets its own copy and
// the linker cannot keep the AVX-512 one for the AVX2 file.
//
// Scheme: a "panel" is V::kRows weight rows (16 for AVX-512, 8 for AVX2). Unpacking a panel's block
// transposes it so that one vector holds 4 consecutive u bytes (see quant_blocks.h) of each of the rows:
// one integer dot-product step against 4 activation bytes broadcast to every lane then advances all
// the rows' dot products at once, and each sub-block ends with a single convert + scale + accumulate,
// with no horizontal reductions. Prefill packs whole panels once and streams every activation row over
// them (a V::kPrefillPanels x V::kTileM register tile); decode unpacks block by block into registers
// and uses them at once, two panels per loop.
//
// Every output is the same float sequence whatever the kernel, tile or ISA: per sub-block,
// acc = fma(float(idot) * d_x, scale, acc), then acc = fma(min, s_x, acc). The integer dot products are
// exact, so a row's result does not depend on how many activation rows share the call, and the ISAs
// agree bit for bit.
//
// What V provides (see the two definitions): vector types I (int) and F (float32), kRows lanes; bitwise
// and shift ops; load_transpose / load_f16 / load_u32 / add_q5_high_bits / bits / or_bits for the
// unpackers; the integer dot step (kVnni: vpdpbusd; otherwise pmaddubsw + pmaddwd, with int16 sums
// over a packer's kGS groups); float ops; store_rows for a panel's last rows; and for quantize_x,
// abs_bits, max_u32, hmax_u32, hsum2_i32 and store_q8 (32 int32 to 32 int8). Tile shapes: kMaxSmallM,
// kSmallPasses, kTileM, kPrefillPanels, decode_panels<P>() (1 or 2 panels per decode loop, per packer).
#pragma once
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "cpu/matmul_kernels.h"
#include "cpu/panels.h"
#include "cpu/unpack_simd.h"

namespace pe::cpu {
namespace {

PE_INLINE int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Activation quantization (see QuantizedX): rounding through cvtps2dq is round-half-even, as the
// portable path's nearbyint.

template <class V>
void quantize_x(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t k, const QuantScheme& s,
                const QuantizedX& out) {
  using F = typename V::F;
  using I = typename V::I;
  constexpr int N = 32 / V::kRows;  // vectors per 32-element block
  static_assert(N == 2 || N == 4, "quantize_x's max tree covers 2 or 4 vectors");
  for (int64_t r = m0; r < m1; r++) {
    const float* xr = x + r * ldx;
    int8_t* q = out.q + r * out.ldq;
    XSub* sub = out.sub + r * out.ldsub;
    for (int64_t b = 0; b < k / 32; b++) {
      // max |x| as the largest |x| bit pattern, which also tells a NaN or Inf (exponent all ones).
      F v[N];
      I a[N];
      for (int i = 0; i < N; i++) {
        v[i] = V::loadu_ps(xr + 32 * b + V::kRows * i);
        a[i] = V::abs_bits(v[i]);
      }
      const I mx = N == 2 ? V::max_u32(a[0], a[1]) : V::max_u32(V::max_u32(a[0], a[1]), V::max_u32(a[2], a[3]));
      const uint32_t amax_bits = V::hmax_u32(mx);
      if (amax_bits >= 0x7f800000u) {  // cvtps2dq would give INT_MIN: see QuantizedX
        std::memset(q + 32 * b, 0, 32);
        for (int j = 0; j < 32 / s.sub; j++) sub[b * (32 / s.sub) + j] = non_finite_xsub();
        continue;
      }
      float amax;
      std::memcpy(&amax, &amax_bits, sizeof amax);
      if (amax < kMinQuantAmax) amax = 0.0f;
      const float d = amax / 127.0f;
      const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
      const F vid = V::set1_ps(id);
      I qi[N];
      for (int i = 0; i < N; i++) qi[i] = V::cvt_i32(V::mul(v[i], vid));
      V::store_q8(q + 32 * b, qi);
      I h0 = qi[0], h1 = qi[N / 2];
      for (int i = 1; i < N / 2; i++) {
        h0 = V::add_i32(h0, qi[i]);
        h1 = V::add_i32(h1, qi[N / 2 + i]);
      }
      int s0, s1;
      V::hsum2_i32(h0, h1, s0, s1);
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
// Shared pieces.

// The panel at rows [rp, rp + kRows) of w; a last panel with fewer rows is copied to `tail` with its
// last row repeated, so that kernels always read kRows evenly spaced rows (the copies' results are not
// stored).
template <class V, class P>
PanelRows panel_at(const WeightView& w, int64_t rp, int64_t r1, ScratchBuffer& tail) {
  const auto* base = static_cast<const uint8_t*>(w.data);
  if (r1 - rp >= V::kRows) return PanelRows{base + rp * int64_t(w.row_stride), int64_t(w.row_stride)};
  const int64_t rb = w.cols / P::kBlock * P::kBytes;
  auto* d = static_cast<uint8_t*>(tail.get(size_t(V::kRows * rb)));
  for (int i = 0; i < V::kRows; i++)
    std::memcpy(d + i * rb, base + std::min(rp + i, r1 - 1) * int64_t(w.row_stride), rb);
  return PanelRows{d, rb};
}

// Writes kRows-row results for NC activation rows to y[c * ldy + row0 + lane], keeping the first nrows.
template <class V, int NC>
PE_INLINE void store_panel(const typename V::F (&acc)[NC], float* y, int64_t ldy, int64_t row0, int64_t nrows) {
  for (int c = 0; c < NC; c++) {
    float* dst = y + c * ldy + row0;
    if (nrows >= V::kRows) V::storeu_ps(dst, acc[c]);
    else V::store_rows(dst, acc[c], nrows);
  }
}

// Integer dot products of one sub-block (G groups of 4 elements) of NP panels with NC activation rows:
// acc[p][c] lane i = bias_c + sum over the sub-block of u[p][row i] * x[c] (no bias when SIGNED).
// w(p, g) is panel p's vector of group g; row c's 4G int8 values are at xq + c * ldq, its entry at
// xs + c * ldxs.
template <class V, int G, int GS, bool SIGNED, int NP, int NC, class W>
PE_INLINE void dot_sub(const W& w, const int8_t* xq, int64_t ldq, const XSub* xs, int64_t ldxs,
                       typename V::I (&acc)[NP][NC]) {
  using I = typename V::I;
  if constexpr (V::kVnni) {
    static_assert(!SIGNED, "vpdpbusd takes unsigned weights");
    // Few independent chains (decode): two accumulators per output halve the vpdpbusd dependency chain.
    constexpr int kChains = NP * NC < 4 ? 2 : 1;
    I part[kChains][NP][NC];
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) {
      const I bias = V::set1_i32(xs[c * ldxs].bias);
#pragma GCC unroll 4
      for (int p = 0; p < NP; p++) {
        part[0][p][c] = bias;
        if (kChains == 2) part[kChains - 1][p][c] = V::zero_i();
      }
    }
#pragma GCC unroll 8
    for (int g = 0; g < G; g++) {
      I wv[NP];
#pragma GCC unroll 4
      for (int p = 0; p < NP; p++) wv[p] = w(p, g);
#pragma GCC unroll 8
      for (int c = 0; c < NC; c++) {
        const I xb = V::set1_i32(load_i32(xq + c * ldq + 4 * g));
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) part[g % kChains][p][c] = V::dpbusd(part[g % kChains][p][c], wv[p], xb);
      }
    }
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 4
      for (int p = 0; p < NP; p++)
        acc[p][c] = kChains == 2 ? V::add_i32(part[0][p][c], part[kChains - 1][p][c]) : part[0][p][c];
  } else {
    // pmaddubsw sums pairs of u8 x s8 products to int16 (saturating); GS groups' sums stay in int16
    // before one pmaddwd widens them (the packer's kGS keeps them below 2^15).
    const I ones = V::set1_i16(1);
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++)
#pragma GCC unroll 4
      for (int p = 0; p < NP; p++) acc[p][c] = SIGNED ? V::zero_i() : V::set1_i32(xs[c * ldxs].bias);
#pragma GCC unroll 8
    for (int g0 = 0; g0 < G; g0 += GS) {
      I s16[NP][NC];
      for (int g = g0; g < g0 + GS && g < G; g++) {
        I wv[NP], wabs[NP];
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) {
          wv[p] = w(p, g);
          wabs[p] = SIGNED ? V::sign_i8(wv[p], wv[p]) : wv[p];
        }
#pragma GCC unroll 8
        for (int c = 0; c < NC; c++) {
          const I xb = V::set1_i32(load_i32(xq + c * ldq + 4 * g));
#pragma GCC unroll 4
          for (int p = 0; p < NP; p++) {
            const I prod = V::maddubs(wabs[p], SIGNED ? V::sign_i8(xb, wv[p]) : xb);
            s16[p][c] = g == g0 ? prod : V::add_i16(s16[p][c], prod);
          }
        }
      }
#pragma GCC unroll 8
      for (int c = 0; c < NC; c++)
#pragma GCC unroll 4
        for (int p = 0; p < NP; p++) acc[p][c] = V::add_i32(acc[p][c], V::madd_i16(s16[p][c], ones));
    }
  }
}

// The float step that ends every sub-block: acc += float(idot) * d_x * scale (+ min * s_x).
template <class V, bool MIN, int NC>
PE_INLINE void scale_sub(const typename V::I (&idot)[NC], typename V::F scale, typename V::F min, const XSub* xs,
                         int64_t ldxs, typename V::F (&acc)[NC]) {
#pragma GCC unroll 8
  for (int c = 0; c < NC; c++) {
    const typename V::F v = V::mul(V::cvt(idot[c]), V::set1_ps(xs[c * ldxs].d));
    acc[c] = V::fmadd(v, scale, acc[c]);
  }
  if (MIN)
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) acc[c] = V::fmadd(min, V::set1_ps(xs[c * ldxs].s), acc[c]);
}

// ---------------------------------------------------------------------------------------------------
// Decode (few activation rows): unpack each unit of a panel into registers and use it at once.

// NP panels at once (rows.p + kRows p * stride): independent dependency chains for the out-of-order
// core.
template <class V, class P, int NC, int NP, class R>
__attribute__((noinline)) void gemm_small_panel(const R& rows, int64_t nblk, const int8_t* xq, int64_t ldq,
                                                const XSub* xs, int64_t ldxs, float* y, int64_t ldy, int64_t row0,
                                                int64_t nrows, const uint8_t* prefetch_end) {
  using I = typename V::I;
  using F = typename V::F;
  F acc[NP][NC];
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc[p][c] = V::zero_ps();
  R pr[NP];
  for (int p = 0; p < NP; p++) pr[p] = R{rows.p + V::kRows * p * rows.stride, rows.stride};
  // Rows as stored: kRows streams advancing a few bytes per step, prefetched row by row (RowPrefetch). A
  // packed panel is one stream, yet the hardware prefetchers alone kept a memory-bound decode below the
  // bandwidth: each block's bytes are asked for as far ahead as DecodeTuning says, past the panel's end
  // into the next panels (they follow it in memory) up to prefetch_end, the last panel's end.
  constexpr bool kPacked = std::is_same_v<R, PackedPanel>;
  constexpr int64_t kBlockBytes = V::kRows * P::kBytes;  // a block of the panel's rows
  const int64_t next_bytes = kPacked ? 0 : NP * V::kRows * rows.stride;
  const RowPrefetch next(rows.p + NP * V::kRows * rows.stride, next_bytes, nblk);
  const DecodeTuning tuning = decode_tuning();
  // Fewer rows spend less time on each block, so the same lead in time takes more bytes: the several-row
  // distance is for kMaxSmallM rows, and NC rows ask kMaxSmallM / NC times as far ahead (DecodeTuning).
  const int64_t ahead = !kPacked                     ? 0
                        : NC >= 2 && P::kBlock == 32 ? tuning.rows_prefetch_bytes * V::kMaxSmallM / NC
                                                     : tuning.prefetch_bytes;
  const int64_t spread = kPacked && P::kTail < P::kBytes ? tuning.spread_bytes : 0;
  for (int64_t b = 0; b < nblk; b++) {
    next.step(b);
    if (ahead > 0) {
      const int64_t lo = (b * kBlockBytes + ahead) & ~int64_t(63);
      for (int p = 0; p < NP; p++) {
        const int64_t hi = std::min((b + 1) * kBlockBytes + ahead, int64_t(prefetch_end - pr[p].p));
        for (int64_t o = lo; o < hi; o += 64) __builtin_prefetch(pr[p].p + o, 0, 3);
      }
      // A block whose scales sit at its end (Q6_K, Q3_K, Q2_K's d) is read tail first: the tail asked
      // for with the rest of the block arrives after begin() has stalled on it. Ask a block ahead. (A branch:
      // clamping the end at the last block instead, as above, compiled to a loop ~15 % slower on Zen 4.)
      if constexpr (P::kTail < P::kBytes) {
        if (b + 1 < nblk) {
          const int64_t t0 = ((b + 1) * kBlockBytes + V::kRows * P::kTail) & ~int64_t(63);
          for (int p = 0; p < NP; p++)
            for (int64_t o = t0; o < (b + 2) * kBlockBytes; o += 64) __builtin_prefetch(pr[p].p + o, 0, 3);
        }
      }
    }
#pragma GCC unroll 2
    for (int p = 0; p < NP; p++) {
      typename P::State st;
      P::begin(pr[p], b * P::kBytes, st);
#pragma GCC unroll 8
      for (int unit = 0; unit < kUnits<P>; unit++) {
        if constexpr (P::kTail < P::kBytes) {
          if (spread > 0) {  // a unit's share of what lies `spread` bytes ahead (DecodeTuning)
            constexpr int64_t kUnitBytes = kBlockBytes / kUnits<P>;
            const int64_t lo = b * kBlockBytes + unit * kUnitBytes + spread;
            const int64_t hi = std::min(lo + kUnitBytes, nblk * kBlockBytes);
            for (int64_t o = lo & ~int64_t(63); o < hi; o += 64) __builtin_prefetch(pr[p].p + o, 0, 3);
          }
        }
        UnitOf<V, P> un;
        P::unpack(pr[p], b * P::kBytes, unit, st, un);
        // Half unrolled: fully unrolling a K-quant unit's 8 sub-blocks measured 16% slower on AVX-512 (Q3_K).
#pragma GCC unroll 4
        for (int s = 0; s < P::kSubsPerUnit; s++) {
          const int sb = unit * P::kSubsPerUnit + s;
          const int64_t j = b * (P::kBlock / P::kSub) + sb;
          I idot[1][NC];
          dot_sub<V, P::kG, P::kGS, P::kSigned, 1, NC>([&](int, int g) { return un.u[s][g]; }, xq + j * P::kSub,
                                                       ldq, xs + j, ldxs, idot);
          scale_sub<V, P::kMin, NC>(idot[0], st.scale[sb], st.min[sb], xs + j, ldxs, acc[p]);
        }
      }
    }
  }
  for (int p = 0; p < NP; p++) store_panel<V, NC>(acc[p], y, ldy, row0 + V::kRows * p, nrows - V::kRows * p);
}

// Rows [r0, r1) of W against NC activation rows from m0; panel(rp) gives the panel at row rp (rows as
// stored, or packed).
template <class V, class P, int NC, class Panel>
void gemm_small_rows(const Panel& panel, int64_t nblk, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0,
                     float* y, int64_t ldy, const uint8_t* prefetch_end = nullptr /* packed panels' end */) {
  const int8_t* xq = x.q + m0 * x.ldq;
  const XSub* xs = x.sub + m0 * x.ldsub;
  int64_t rp = r0;
  // Two panels per loop give the core independent chains; with more rows the rows already do. Where the
  // CPU prefers one stream at a time (DecodeTuning), one.
  if constexpr (V::template decode_panels<P>() == 2 && NC <= 3)
    if (decode_tuning().two_panels)
      for (; rp + 2 * V::kRows <= r1; rp += 2 * V::kRows)
        gemm_small_panel<V, P, NC, 2>(panel(rp), nblk, xq, x.ldq, xs, x.ldsub, y + m0 * ldy, ldy, rp, 2 * V::kRows,
                                          prefetch_end);
  for (; rp < r1; rp += V::kRows)
    gemm_small_panel<V, P, NC, 1>(panel(rp), nblk, xq, x.ldq, xs, x.ldsub, y + m0 * ldy, ldy, rp,
                                  std::min<int64_t>(V::kRows, r1 - rp), prefetch_end);
}

// W's packed panels, when it has them for this ISA's panel height (r0 is then a panel boundary: the
// front end splits rows in multiples of 16).
template <class V>
PE_INLINE bool has_panels(const WeightView& w) { return w.panels && w.panel_rows == V::kRows; }

template <class V>
PE_INLINE PackedPanel packed_panel(const WeightView& w, int64_t rp) {
  return PackedPanel{static_cast<const uint8_t*>(w.panels) + rp * int64_t(w.row_stride), int64_t(w.row_stride)};
}

template <class V, class P, int NC>
void gemm_small(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, float* y, int64_t ldy) {
  const int64_t nblk = w.cols / P::kBlock;
  if (has_panels<V>(w)) {
    const uint8_t* end = static_cast<const uint8_t*>(w.panels) + panel_bytes(w, V::kRows);
    return gemm_small_rows<V, P, NC>([&](int64_t rp) { return packed_panel<V>(w, rp); }, nblk, x, r0, r1, m0, y, ldy,
                                     end);
  }
  thread_local ScratchBuffer tail;
  gemm_small_rows<V, P, NC>([&](int64_t rp) { return panel_at<V, P>(w, rp, r1, tail); }, nblk, x, r0, r1, m0, y, ldy);
}

// ---------------------------------------------------------------------------------------------------
// Prefill (many activation rows): pack whole panels into a buffer, then stream activation rows over
// them. Packed layout, per sub-block of 4G elements:
//   G vectors  the unit's u vectors
//   1 vector   scales (floats)
//   1 vector   mins (types with a min only)

template <class V, int G, bool MIN>
constexpr int kSubBytes = G * sizeof(typename V::I) + (MIN ? 2 : 1) * sizeof(typename V::F);

// Q (matrix units, matmul_amx.h): store the signed q = u - offset instead of u.
template <class V, class P, bool Q, class R>
__attribute__((noinline)) void pack_panel(const R& rows, int64_t nblk, uint8_t* dst) {
  static_assert(!Q || (P::S.max_u - P::S.offset <= 127 && P::S.offset <= 128 && !P::kScaledU), "q must fit int8");
  constexpr int kVec = sizeof(typename V::I);
  for (int64_t b = 0; b < nblk; b++) {
    typename P::State st;
    P::begin(rows, b * P::kBytes, st);
    for (int unit = 0; unit < kUnits<P>; unit++) {
      UnitOf<V, P> un;
      P::unpack(rows, b * P::kBytes, unit, st, un);
      for (int s = 0; s < P::kSubsPerUnit; s++, dst += kSubBytes<V, P::kG, P::kMin>) {
        for (int g = 0; g < P::kG; g++) {
          if constexpr (Q) V::store_i(dst + kVec * g, V::sub_i8(un.u[s][g], V::set1_i8(P::S.offset)));
          else V::store_i(dst + kVec * g, un.u[s][g]);
        }
        V::store_ps(dst + kVec * P::kG, st.scale[unit * P::kSubsPerUnit + s]);
        if (P::kMin) V::store_ps(dst + kVec * P::kG + kVec, st.min[unit * P::kSubsPerUnit + s]);
      }
    }
  }
}

// Where run_tile finds a sub-block's u vectors, scales and mins: in the buffer pack_panel wrote.
template <class V, int G, bool MIN, bool Q = false>
struct TileLayout {
  using I = typename V::I;
  using F = typename V::F;
  static constexpr int kVec = sizeof(I);
  static constexpr int64_t kSubBytes = pe::cpu::kSubBytes<V, G, MIN>;
  static PE_INLINE I u(const uint8_t* sub, int g) { return V::load_i(sub + kVec * g); }
  static PE_INLINE F scale(const uint8_t* sub) { return V::load_ps(sub + kVec * G); }
  static PE_INLINE F min(const uint8_t* sub) { return V::load_ps(sub + kVec * G + kVec); }
  // For matrix units (matmul_amx.h): the vectors are G rows of kRows x 4 bytes from kUOffset, holding
  // the signed q (pack_panel's Q), whose dot product with x is u's plus the bias.
  static constexpr int kUOffset = 0;
  static constexpr bool kRawQ = Q;
};

// Q8_0 with vpdpbusd, read straight from the model's panel copy (cpu/panels.h), unpacked on the fly:
// a block is its 16 fp16 scales, then 8 words of each row side by side; u = q + 128. Packing a
// buffer first cost as much as the flips and conversions done here for every tile.
template <class V>
struct Q8_0PanelLayout {
  using I = typename V::I;
  using F = typename V::F;
  static constexpr int64_t kSubBytes = int64_t(V::kRows) * 34;
  static PE_INLINE I u(const uint8_t* sub, int g) {
    return V::xor_(V::loadu_i(sub + V::kRows * (2 + 4 * g)), V::set1_i8(0x80));
  }
  static PE_INLINE F scale(const uint8_t* sub) { return V::cvt_f16(sub); }
  static PE_INLINE F min(const uint8_t* sub) { return scale(sub); }
  // For matrix units: the words after the scales are the signed q, whose dot product with x equals
  // u's plus the bias (u = q + 128, bias = -128 * sum(x)), so a signed x signed product needs no bias.
  static constexpr int kUOffset = 2 * V::kRows;
  static constexpr bool kRawQ = true;
};

// Register tile: NP panels (panel p at pan + p * pstride, in layout L) x NC activation rows from row c0,
// over nsub sub-blocks; stores rows [rp, rp + nrows) of the NC outputs.
template <class V, class L, int G, int GS, bool MIN, bool SIGNED, int NP, int NC>
void run_tile(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x, int64_t c0, float* y,
              int64_t ldy, int64_t rp, int64_t nrows) {
  using I = typename V::I;
  using F = typename V::F;
  F acc[NP][NC];
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc[p][c] = V::zero_ps();
  const int8_t* xq = x.q + c0 * x.ldq;
  const XSub* xs = x.sub + c0 * x.ldsub;
  for (int64_t j = 0; j < nsub; j++, pan += L::kSubBytes, xq += 4 * G, xs++) {
    I idot[NP][NC];
    dot_sub<V, G, GS, SIGNED, NP, NC>([&](int p, int g) { return L::u(pan + p * pstride, g); }, xq, x.ldq, xs,
                                      x.ldsub, idot);
#pragma GCC unroll 4
    for (int p = 0; p < NP; p++) {
      const F sc = L::scale(pan + p * pstride);
      const F mn = MIN ? L::min(pan + p * pstride) : sc;
      scale_sub<V, MIN, NC>(idot[p], sc, mn, xs, x.ldsub, acc[p]);
    }
  }
  for (int p = 0; p < NP && nrows - V::kRows * p > 0; p++)
    store_panel<V, NC>(acc[p], y + c0 * ldy, ldy, rp + V::kRows * p, nrows - V::kRows * p);
}

template <class V, class L, int G, int GS, bool MIN, bool SIGNED, int NP, int... Tails>
PE_INLINE void run_tile_tail(int64_t left, const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x,
                             int64_t c, float* y, int64_t ldy, int64_t rp, int64_t nrows,
                             std::integer_sequence<int, Tails...>) {
  ((left == Tails + 1
        ? run_tile<V, L, G, GS, MIN, SIGNED, NP, Tails + 1>(pan, pstride, nsub, x, c, y, ldy, rp, nrows)
        : void()),
   ...);
}

template <class V, class L, int G, int GS, bool MIN, bool SIGNED, int NP>
__attribute__((noinline)) void run_tiles(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x,
                                         int64_t m0, int64_t m1, float* y, int64_t ldy, int64_t rp, int64_t nrows) {
  constexpr int M = V::kTileM;
  int64_t c = m0;
  for (; c + M <= m1; c += M) run_tile<V, L, G, GS, MIN, SIGNED, NP, M>(pan, pstride, nsub, x, c, y, ldy, rp, nrows);
  if (c < m1)
    run_tile_tail<V, L, G, GS, MIN, SIGNED, NP>(m1 - c, pan, pstride, nsub, x, c, y, ldy, rp, nrows,
                                                std::make_integer_sequence<int, M - 1>{});
}

// How gemm_large runs activation rows over packed panels: register tiles (run_tiles) here; an ISA
// with a matrix unit passes its own (matmul_amx.h) with the same results. kRawQ: whether it wants the
// packed panels to hold the signed q rather than u; runs<P>: whether it takes weights of packer P
// (gemm_quant gives the others to register tiles).
struct RegisterTiles {
  static constexpr bool kRawQ = false;
  template <class P>
  static constexpr bool runs = true;
  template <class V, class L, int G, int GS, bool MIN, bool SIGNED, int NP>
  static PE_INLINE void run(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x, int64_t m0,
                            int64_t m1, float* y, int64_t ldy, int64_t rp, int64_t nrows) {
    run_tiles<V, L, G, GS, MIN, SIGNED, NP>(pan, pstride, nsub, x, m0, m1, y, ldy, rp, nrows);
  }
};

template <class V, class P, class Tiles>
void gemm_large(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  constexpr int G = P::kG, NP = V::kPrefillPanels;
  static_assert(NP == 1 || NP == 2, "gemm_large runs full tiles of NP panels, then single panels");
  const int64_t nblk = w.cols / P::kBlock;
  const int64_t nsub = w.cols / P::kSub;
  if constexpr (std::is_same_v<P, PackQ8_0<V>> && V::kVnni) {
    if (has_panels<V>(w)) {  // read in place (Q8_0PanelLayout); r0 is a panel boundary (see has_panels)
      using L = Q8_0PanelLayout<V>;
      const auto* base = static_cast<const uint8_t*>(w.panels);
      for (int64_t rp = r0; rp < r1; rp += NP * V::kRows) {
        const uint8_t* pan = base + rp * int64_t(w.row_stride);
        const int64_t pstride = V::kRows * int64_t(w.row_stride);
        if (r1 - rp > (NP - 1) * V::kRows)
          Tiles::template run<V, L, G, P::kGS, false, false, NP>(pan, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
        else
          Tiles::template run<V, L, G, P::kGS, false, false, 1>(pan, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
      }
      return;
    }
  }
  using L = TileLayout<V, G, P::kMin, Tiles::kRawQ>;
  const int64_t pstride = nsub * kSubBytes<V, G, P::kMin>;
  thread_local ScratchBuffer packed, tail;
  auto* buf = static_cast<uint8_t*>(packed.get(size_t(NP * pstride)));
  for (int64_t rp = r0; rp < r1; rp += NP * V::kRows) {
    const int np = r1 - rp > (NP - 1) * V::kRows ? NP : 1;
    for (int p = 0; p < np; p++) {
      if (has_panels<V>(w))
        pack_panel<V, P, L::kRawQ>(packed_panel<V>(w, rp + V::kRows * p), nblk, buf + p * pstride);
      else
        pack_panel<V, P, L::kRawQ>(panel_at<V, P>(w, rp + V::kRows * p, r1, tail), nblk, buf + p * pstride);
    }
    if (np == NP)
      Tiles::template run<V, L, G, P::kGS, P::kMin, P::kSigned, NP>(buf, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
    else
      Tiles::template run<V, L, G, P::kGS, P::kMin, P::kSigned, 1>(buf, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
  }
}

template <class V, class P, int... N>
PE_INLINE void small_rows(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                          float* y, int64_t ldy, std::integer_sequence<int, N...>) {
  ((m1 - m0 == N + 1 ? gemm_small<V, P, N + 1>(w, x, r0, r1, m0, y, ldy) : void()), ...);
}

template <class V, class P, class Tiles>
void gemm_type(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
               int64_t ldy) {
  // Up to kMaxSmallM rows (a decode step of a few sequences) unpack each weight unit into registers
  // and use it for every row at once: packing a panel to memory first only pays for many rows.
  // Up to kSmallPasses times that, as many passes over the weights still cost less than packing them
  // (for the 32-element block types DecodeTuning may say how many).
  int passes = V::kSmallPasses;
  if constexpr (P::kBlock == 32)
    if (const int tuned = decode_tuning().small_passes_32) passes = tuned;
  if (m1 - m0 > passes * V::kMaxSmallM) return gemm_large<V, P, Tiles>(w, x, r0, r1, m0, m1, y, ldy);
  for (int64_t c = m0; c < m1; c += V::kMaxSmallM)
    small_rows<V, P>(w, x, r0, r1, c, std::min<int64_t>(m1, c + V::kMaxSmallM), y, ldy,
                     std::make_integer_sequence<int, V::kMaxSmallM>{});
}

template <class V, class Tiles = RegisterTiles>
void gemm_quant(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  with_packer<V>(w.type, [&](auto packer) {
    using P = decltype(packer);
    using T = std::conditional_t<Tiles::template runs<P>, Tiles, RegisterTiles>;
    gemm_type<V, P, T>(w, x, r0, r1, m0, m1, y, ldy);
  });
}

}  // namespace
}  // namespace pe::cpu
