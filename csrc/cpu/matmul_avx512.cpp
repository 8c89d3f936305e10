// AVX-512 matmul kernels (F, BW, VL, DQ, VNNI). This file is compiled with those ISA flags and is only
// called once cpu_path() says the CPU has them.
//
// Quantized weights: a "panel" is 16 weight rows. Packing a panel's block transposes it so that one
// zmm holds 4 consecutive elements (u bytes, see quant_blocks.h) of each of the 16 rows: one
// vpdpbusd against 4 activation bytes broadcast to every lane then advances 16 row dot products at
// once, and each sub-block ends with a single convert + scale + accumulate for all 16 rows, with no
// horizontal reductions. Prefill packs whole panels once and streams every activation row over them
// (a 32-row x 6-activation-row register tile); decode unpacks block by block into registers and uses
// them at once. Weight unpacking lives in unpack_avx512.h, float weights in matmul_float_avx512.cpp.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/matmul_kernels.h"
#include "cpu/unpack_avx512.h"

// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu {

namespace {

using namespace avx512;  // packers, PanelRows, kPanel

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

}  // namespace

const MatmulKernels kAvx512Kernels = {quantize_x, gemm_quant, gemm_float_avx512};

}  // namespace pe::cpu
