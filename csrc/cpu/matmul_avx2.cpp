// AVX2 matmul kernels (AVX2, FMA, F16C). Compiled with those ISA flags; called only when cpu_path() is
// AVX2 (or from nowhere on CPUs without it).
//
// Same scheme as the AVX-512 kernels (see matmul_avx512.cpp) with 8-row panels: one ymm holds 4
// consecutive u bytes of each of 8 weight rows, and a broadcast of 4 activation bytes multiplies all
// eight at once (unpacking in unpack_avx2.h; float weights in matmul_float_avx2.cpp). Without VNNI the byte products go through pmaddubsw (u8 x s8 -> pairs summed to s16,
// saturating) and pmaddwd: partial sums stay in int16 for as many groups as the type's largest u allows
// without overflow, so small-u types pay one pmaddwd per sub-block. Q8_0 (u up to 255 would saturate)
// keeps signed weights and uses the sign trick, which needs activations != -128 (guaranteed by
// quantize_x).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/matmul_kernels.h"
#include "cpu/unpack_avx2.h"

#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu {

namespace {

using namespace avx2;  // packers, PanelRows, kPanel

constexpr int kMaxSmallM = 3;  // up to this many activation rows, unpack and use at once
constexpr int kTileM = 4;      // activation rows per register tile over packed panels

PE_INLINE int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
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

}  // namespace

const MatmulKernels kAvx2Kernels = {quantize_x, gemm_quant, gemm_float_avx2};

}  // namespace pe::cpu
