// Prefill on Intel AMX tiles (Sapphire Rapids and later): the packed panels of matmul_simd.h's
// gemm_large, multiplied by TDPBSSD instead of vpdpbusd. Included by matmul_avx512.cpp after
// matmul_simd.h; cpu_path() is amx where the CPU has the tiles and the OS grants them.
//
// A sub-block's packed vectors are already the layout a tile multiply wants for its right operand
// (B: G rows of 4 bytes x 16 weight rows, the VNNI order; packed as the signed q = u - offset, so
// that no bias is added), and the quantized activations' rows are its left operand (A: up to 16
// activation rows of 4G int8 at stride ldq). One multiply gives the 16 x 16 integer dot products of a
// sub-block, exactly the integers vpdpbusd gives, and the float step after it is scale_sub's,
// operation for operation: results equal the AVX-512 path's bit for bit (tests/test_kernels.py holds
// them to that), so AMX changes speed only.
//
// What bounds it is that float step and the tile traffic around each multiply, not the multiplies:
// per sub-block and output a convert, a multiply and an fma on the vector ports, and per sub-block a
// zeroed C tile stored for them to read (a K of only 4G bytes per multiply). So the kernel keeps one
// 16 x 16 block of float accumulators in 16 registers (memory accumulators cost a load and a store per
// row) and pipelines: the multiplies of sub-blocks j and j + 1 go back to back into one pair of C
// tiles while the float steps of j - 2 and j - 1 read what the other pair stored a stage before (a
// vector load right after a tile store of the same bytes waits for it). Measured against AVX-512 VNNI
// (prefill of real models, one Xeon, README "Development"), it is faster only for the types with one
// scale per 32 weights and no min, Q4_0 and Q8_0 (runs<P>); the others stay on register tiles.
#pragma once
#include <immintrin.h>

namespace pe::cpu {
namespace {

// LDTILECFG's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// Tiles 0-3: C (rows x 16 int32); 4, 5: A (rows activation rows x 4G int8); 6, 7: B (G x 64 bytes).
template <int G>
PE_INLINE void amx_configure(int rows) {
  TileConfig cfg;
  for (int t = 0; t < 4; t++) cfg.colsb[t] = 64, cfg.rows[t] = uint8_t(rows);
  for (int t = 4; t < 6; t++) cfg.colsb[t] = 4 * G, cfg.rows[t] = uint8_t(rows);
  for (int t = 6; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = G;
  _tile_loadconfig(&cfg);
}

// Half H (0 or 1) of the pipeline: sub-blocks j and j + 1 (when below nsub) into C tiles 2H and
// 2H + 1 through A4/B6 and A5/B7, stored to out0 and out1. The two multiplies are issued back to
// back so that the matrix unit overlaps them (one sub-block at a time, each multiply waits for its
// loads and its store for it). GCC's tile intrinsics paste their tile numbers into the assembly text,
// so they must be literals: one branch per half.
template <int H, int G, class L>
PE_INLINE void amx_multiply_pair(int64_t j, int64_t nsub, const int8_t* xq, int64_t ldq, const uint8_t* pan,
                                 int32_t* out0, int32_t* out1) {
  const int8_t* a0 = xq + 4 * G * j;
  const uint8_t* b0 = pan + j * L::kSubBytes + L::kUOffset;
  const bool second = j + 1 < nsub;
#define PE_AMX_PAIR(C0, C1)                    \
  _tile_loadd(4, a0, ldq);                     \
  _tile_loadd(6, b0, 64);                      \
  if (second) {                                \
    _tile_loadd(5, a0 + 4 * G, ldq);           \
    _tile_loadd(7, b0 + L::kSubBytes, 64);     \
  }                                            \
  _tile_zero(C0);                              \
  _tile_dpbssd(C0, 4, 6);                      \
  if (second) {                                \
    _tile_zero(C1);                            \
    _tile_dpbssd(C1, 5, 7);                    \
  }                                            \
  _tile_stored(C0, out0, 64);                  \
  if (second) _tile_stored(C1, out1, 64)
  if constexpr (H == 0) {
    PE_AMX_PAIR(0, 1);
  } else {
    PE_AMX_PAIR(2, 3);
  }
#undef PE_AMX_PAIR
}

// scale_sub's float step for activation row R of one sub-block: acc (16 weight rows per vector) +=
// float(idot[R]) * d_x * scale.
template <class V, int R>
PE_INLINE void amx_scale_row(const int32_t* idot, typename V::F sc, const XSub* xs, int64_t ldsub, typename V::F& acc) {
  acc = V::fmadd(V::mul(V::cvt(V::load_i(idot + 16 * R)), V::set1_ps(xs[R * ldsub].d)), sc, acc);
}

// The float step for one sub-block's first nr rows (all 16 when FULL). The rows are spelled out by a
// parameter pack, not a loop: GCC keeps acc in registers only when every index is a constant before
// its scalar replacement runs, which an unroll pragma comes too late for.
template <class V, class L, bool FULL, int... R>
PE_INLINE void amx_scale(const int32_t* idot, const uint8_t* sub, const XSub* xs, int64_t ldsub, int nr,
                         typename V::F (&acc)[16], std::integer_sequence<int, R...>) {
  const typename V::F sc = L::scale(sub);
  ((FULL || R < nr ? amx_scale_row<V, R>(idot, sc, xs, ldsub, acc[R]) : void()), ...);
}

template <class V, int... R>
PE_INLINE void amx_zero(typename V::F (&acc)[16], std::integer_sequence<int, R...>) {
  ((acc[R] = V::zero_ps()), ...);
}

// Stores the first nr rows of acc (all 16 when FULL) to y + R * ldy, their first nrows lanes.
template <class V, bool FULL, int... R>
PE_INLINE void amx_store_rows(const typename V::F (&acc)[16], float* y, int64_t ldy, int nr, int64_t nrows,
                              std::integer_sequence<int, R...>) {
  auto store = [&](float* dst, typename V::F v) {
    if (nrows >= 16) V::storeu_ps(dst, v);
    else V::store_rows(dst, v, nrows);
  };
  ((FULL || R < nr ? store(y + R * ldy, acc[R]) : void()), ...);
}

// Sub-blocks between a multiply and its float step, and the ring of stored products that spans them.
constexpr int kAmxLag = 2;
constexpr int kAmxRing = 4;
// How far ahead (in sub-blocks) the activation rows are prefetched: T5-base encoder, 256 tokens, Q8_0,
// one thread, Xeon model 167: 8 ahead +3 %, 16 ahead +4 %.
constexpr int kAmxAhead = 16;

// Pipeline half H at sub-block j: the multiplies of j and j + 1 into the ring, then the float steps of
// j - kAmxLag and the one after it, stored kAmxLag / 2 stages ago.
template <class V, class L, int G, bool FULL, int H>
PE_INLINE void amx_stage(int64_t j, int64_t nsub, const uint8_t* pan, const int8_t* xq, int64_t ldq,
                         const XSub* xs, int64_t ldsub, int nr, int32_t (&idot)[kAmxRing][256],
                         typename V::F (&acc)[16]) {
  if (j < nsub) {
    // The activation rows' line of sub-blocks j + kAmxAhead and the next (16 rows, ldq apart, read from L2
    // and not followed by the hardware prefetchers).
    if (j + kAmxAhead < nsub)
      for (int r = 0; r < nr; r++) _mm_prefetch(reinterpret_cast<const char*>(xq + r * ldq + 4 * G * (j + kAmxAhead)), _MM_HINT_T0);
    amx_multiply_pair<H, G, L>(j, nsub, xq, ldq, pan, idot[j % kAmxRing], idot[(j + 1) % kAmxRing]);
  }
  for (int k = 0; k < 2; k++) {
    const int64_t js = j - kAmxLag + k;
    if (js >= 0 && js < nsub)
      amx_scale<V, L, FULL>(idot[js % kAmxRing], pan + js * L::kSubBytes, xs + js, ldsub, nr, acc,
                            std::make_integer_sequence<int, 16>{});
  }
}

// nr (<= 16, as configured; 16 when FULL) activation rows from c0 against one panel (layout L) over
// all nsub sub-blocks; stores rows [rp, rp + nrows) of the outputs.
template <class V, class L, int G, bool FULL>
__attribute__((noinline)) void amx_block(const uint8_t* pan, int64_t nsub, const QuantizedX& x, int64_t c0, int nr,
                                         float* y, int64_t ldy, int64_t rp, int64_t nrows) {
  using F = typename V::F;
  F acc[16];  // indexed by constants only (see amx_scale)
  amx_zero<V>(acc, std::make_integer_sequence<int, 16>{});
  alignas(64) int32_t idot[kAmxRing][256];
  const int8_t* xq = x.q + c0 * x.ldq;
  const XSub* xs = x.sub + c0 * x.ldsub;
  const int64_t ldq = x.ldq, ldsub = x.ldsub;
  for (int64_t j = 0; j < nsub + kAmxLag; j += 4) {
    amx_stage<V, L, G, FULL, 0>(j, nsub, pan, xq, ldq, xs, ldsub, nr, idot, acc);
    amx_stage<V, L, G, FULL, 1>(j + 2, nsub, pan, xq, ldq, xs, ldsub, nr, idot, acc);
  }
  amx_store_rows<V, FULL>(acc, y + c0 * ldy + rp, ldy, nr, nrows, std::make_integer_sequence<int, 16>{});
}

// gemm_large's tile runner on AMX (packed panels hold q, not u: kRawQ).
struct AmxTiles {
  static constexpr bool kRawQ = true;
  template <class P>
  static constexpr bool runs = P::kType == GGMLType::Q4_0 || P::kType == GGMLType::Q8_0;
  template <class V, class L, int G, int GS, bool MIN, bool SIGNED, int NP>
  static void run(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x, int64_t m0, int64_t m1,
                  float* y, int64_t ldy, int64_t rp, int64_t nrows) {
    static_assert(V::kRows == 16 && L::kRawQ && !SIGNED && !MIN, "AMX reads the AVX-512 panels, holding q");
    // Configured per call, not once per thread: other code on this thread (a library using AMX in the
    // same process) may have loaded its own shapes or released the tiles in between.
    const int64_t full = (m1 - m0) / 16 * 16, tail = (m1 - m0) - full;
    for (int p = 0; p < NP && nrows - 16 * p > 0; p++) {
      const uint8_t* panel = pan + p * pstride;
      if (full) {
        amx_configure<G>(16);
        for (int64_t c = m0; c < m0 + full; c += 16)
          amx_block<V, L, G, true>(panel, nsub, x, c, 16, y, ldy, rp + 16 * p, nrows - 16 * p);
      }
      if (tail) {
        amx_configure<G>(int(tail));
        amx_block<V, L, G, false>(panel, nsub, x, m0 + full, int(tail), y, ldy, rp + 16 * p, nrows - 16 * p);
      }
    }
    _tile_release();
  }
};

}  // namespace
}  // namespace pe::cpu
