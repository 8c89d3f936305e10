// Encoder prefill on AMX bfloat16 tiles (Sapphire Rapids and later): y = x W^T with x and W's
// dequantized values both rounded to bfloat16 and the products summed in float32 (TDPBF16PS). Included
// by matmul_avx512.cpp after matmul_amx.h; used for passes that ops/matmul.h's MatmulRounding::Bf16 asks
// for (an encoder's whole input at once), where the path is amx.
//
// Why not the int8 tiles of matmul_amx.h: with a scale per 32 weights, each 16 x 16 block of integer
// dot products covers only 32 of K, and must be stored from its tile and scaled on the vector ports
// before the next; that float step and tile traffic held the int8 kernel to ~240 GMAC/s on one core
// (Xeon model 167). Rounded to bfloat16, a weight panel is dequantized once per call and each 2 x 2 block
// of C tiles accumulates over all of K in the tiles: ~400 GMAC/s with the dequantization included. The
// rounding is finer than the int8 path's: x to 8 significant bits per element instead of 8 bits per
// 32-element block, W's q * d to 8 significant bits (exact before): on random Q8_0 data the error
// against exact float64 products is 2-4x smaller (mean 0.046 vs 0.102 with normal x; rms 2.3e-3 vs
// 9.7e-3 with heavy-tailed x). tests/test_kernels.py holds the results to a numpy model of this rounding.
//
// Layouts (bf16 as uint16_t):
//   x tiles  [row group of 16][sub-block j][16 rows][32 values]: one A tile per (group, j), 1 KiB,
//            contiguous; rows past m are zeros.
//   W tiles  [sub-block j][16 pairs of k][16 weight rows][2 values]: the B tile of one panel's j
//            (TDPBF16PS's pair order), written per panel into a thread's buffer.
#pragma once
#include <immintrin.h>

namespace pe::cpu {
namespace {

constexpr int64_t kBf16TileBytes = 1024;  // 16 rows of 64 bytes

// Rounds rows [m0, m1) of x into x tiles, rows from m_end on as zeros (the last group's padding).
// Round to nearest even (VCVTNE2PS2BF16), as the weights.
void pack_x_bf16(const float* x, int64_t ldx, int64_t m0, int64_t m1, int64_t m_end, int64_t k, uint16_t* out) {
  const int64_t nsub = k / 32;
  for (int64_t r = m0; r < m1; r++) {
    uint16_t* dst = out + ((r / 16) * nsub * 16 + r % 16) * 32;
    if (r < m_end) {
      const float* src = x + r * ldx;
      for (int64_t j = 0; j < nsub; j++) {
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 32 * j + 16), _mm512_loadu_ps(src + 32 * j));
        _mm512_store_si512(reinterpret_cast<__m512i*>(dst + j * 512), reinterpret_cast<const __m512i&>(h));
      }
    } else {
      for (int64_t j = 0; j < nsub; j++) _mm512_store_si512(reinterpret_cast<__m512i*>(dst + j * 512), _mm512_setzero_si512());
    }
  }
}

// One sub-block of a panel (layout L: 16 scales, then 8 vectors of 16 rows x 4 signed q) as a B tile.
// Vector g holds k = 4g..4g+3 of each row; tile rows 2g and 2g + 1 want the pairs (4g, 4g+1) and
// (4g+2, 4g+3) of every row.
template <class L>
PE_INLINE void dequantize_sub_bf16(const uint8_t* sub, uint16_t* out) {
  const __m512 sc = L::scale(sub);
  __m512 s[4];  // lane i of quarter j is row 4j + i / 4
  for (int j = 0; j < 4; j++) {
    const __m512i idx = _mm512_add_epi32(_mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2),
                                         _mm512_set1_epi32(4 * j));
    s[j] = _mm512_permutexvar_ps(idx, sc);
  }
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int8_t* q = reinterpret_cast<const int8_t*>(sub + L::kUOffset);
  for (int g = 0; g < 8; g++) {
    __m512 f[4];
    for (int j = 0; j < 4; j++) {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 64 * g + 16 * j));
      f[j] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), s[j]);  // exact: 8 x 11 bits
    }
    const __m512bh lo = _mm512_cvtne2ps_pbh(f[1], f[0]), hi = _mm512_cvtne2ps_pbh(f[3], f[2]);
    const __m512i l = reinterpret_cast<const __m512i&>(lo), h = reinterpret_cast<const __m512i&>(hi);
    _mm512_store_si512(reinterpret_cast<__m512i*>(out + 32 * (2 * g)), _mm512_permutex2var_epi32(l, even, h));
    _mm512_store_si512(reinterpret_cast<__m512i*>(out + 32 * (2 * g + 1)), _mm512_permutex2var_epi32(l, odd, h));
  }
}

// Stores C tile t (16 x 16 floats) to y (ldy floats apart), its first nr rows and nc columns. (GCC's
// tile intrinsics paste their tile number into the assembly text: it must be a literal.)
PE_INLINE void bf16_store_c(int t, float* y, int64_t ldy, int nr, int nc) {
  alignas(64) float c[256];
  const bool direct = nr == 16 && nc == 16;
  float* dst = direct ? y : c;
  const int64_t stride = direct ? ldy * int64_t(sizeof(float)) : 64;
  switch (t) {
    case 0: _tile_stored(0, dst, stride); break;
    case 1: _tile_stored(1, dst, stride); break;
    case 2: _tile_stored(2, dst, stride); break;
    default: _tile_stored(3, dst, stride); break;
  }
  if (!direct)
    for (int r = 0; r < nr; r++) std::memcpy(y + r * ldy, c + 16 * r, size_t(nc) * sizeof(float));
}

// Rows [0, m) of x tiles against two panels' W tiles (b, b + nsub * 512 values) into y[.., col0..):
// 32 rows at a time into C tiles 0-3, each summing over all nsub sub-blocks. ncols: valid columns
// of the two panels (up to 32).
PE_INLINE void bf16_panel_pair(const uint16_t* xt, int64_t m, int64_t nsub, const uint16_t* b, float* y, int64_t ldy,
                               int ncols) {
  const uint16_t* b1 = b + nsub * 512;
  const int nc0 = std::min(ncols, 16), nc1 = std::max(ncols - 16, 0);
  for (int64_t r = 0; r < m; r += 32) {
    const uint16_t* a0 = xt + (r / 16) * nsub * 512;
    const bool two = r + 16 < m;
    const uint16_t* a1 = two ? a0 + nsub * 512 : a0;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t j = 0; j < nsub; j++) {
      // The next A tiles' lines (the x tiles stream from L2; the W tiles of two panels stay in L1/L2).
      if (j + 2 < nsub)
        for (int l = 0; l < 16; l++) {
          _mm_prefetch(reinterpret_cast<const char*>(a0 + (j + 2) * 512) + 64 * l, _MM_HINT_T0);
          if (two) _mm_prefetch(reinterpret_cast<const char*>(a1 + (j + 2) * 512) + 64 * l, _MM_HINT_T0);
        }
      _tile_loadd(4, a0 + j * 512, 64);
      _tile_loadd(6, b + j * 512, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, b1 + j * 512, 64);
      _tile_dpbf16ps(1, 4, 7);
      if (two) {
        _tile_loadd(5, a1 + j * 512, 64);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    const int nr0 = int(std::min<int64_t>(16, m - r)), nr1 = two ? int(std::min<int64_t>(16, m - r - 16)) : 0;
    float* y0 = y + r * ldy;
    bf16_store_c(0, y0, ldy, nr0, nc0);
    if (nc1) bf16_store_c(1, y0 + 16, ldy, nr0, nc1);
    if (nr1) {
      bf16_store_c(2, y0 + 16 * ldy, ldy, nr1, nc0);
      if (nc1) bf16_store_c(3, y0 + 16 * ldy + 16, ldy, nr1, nc1);
    }
  }
}

// Rows [r0, r1) of W (r0 a multiple of 32 from the weight's first row) against the m rows of x tiles,
// 32 weight rows at a time: their panels dequantized into a thread's buffer, then every row of x.
template <class V, class P>
void gemm_bf16_type(const WeightView& w, const uint16_t* xt, int64_t m, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  constexpr int G = P::kG;
  static_assert(V::kRows == 16 && G == 8, "bfloat16 tiles take 16-row panels of 32-element sub-blocks");
  const int64_t nblk = w.cols / P::kBlock, nsub = w.cols / P::kSub;
  thread_local ScratchBuffer wbuf, packed, tail;
  auto* wt = static_cast<uint16_t*>(wbuf.get(size_t(2 * nsub * kBf16TileBytes)));
  TileConfig cfg;
  for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  _tile_loadconfig(&cfg);
  for (int64_t rp = r0; rp < r1; rp += 32) {
    for (int p = 0; p < 2; p++) {
      uint16_t* dst = wt + p * nsub * 512;
      const int64_t row = rp + 16 * p;
      if (row >= r1) {  // a last panel alone: its pair multiplies zeros, not stored
        std::memset(dst, 0, size_t(nsub * kBf16TileBytes));
        continue;
      }
      if constexpr (std::is_same_v<P, PackQ8_0<V>>) {
        if (has_panels<V>(w)) {  // the model's Q8_0 panels, in place
          const uint8_t* pan = static_cast<const uint8_t*>(w.panels) + row * int64_t(w.row_stride);
          constexpr int64_t kSub = Q8_0PanelLayout<V>::kSubBytes;
          for (int64_t j = 0; j < nsub; j++) {
            // The panel streams from memory once per call: ask for the lines kAhead sub-blocks on.
            constexpr int64_t kAhead = 4;
            if (j + kAhead < nsub)
              for (int64_t o = 0; o < kSub; o += 64) _mm_prefetch(reinterpret_cast<const char*>(pan + (j + kAhead) * kSub + o), _MM_HINT_T0);
            dequantize_sub_bf16<Q8_0PanelLayout<V>>(pan + j * kSub, dst + j * 512);
          }
          continue;
        }
      }
      using L = TileLayout<V, G, false, true>;
      auto* buf = static_cast<uint8_t*>(packed.get(size_t(nsub * L::kSubBytes)));
      if (has_panels<V>(w)) pack_panel<V, P, true>(packed_panel<V>(w, row), nblk, buf);
      else pack_panel<V, P, true>(panel_at<V, P>(w, row, r1, tail), nblk, buf);
      for (int64_t j = 0; j < nsub; j++) dequantize_sub_bf16<L>(buf + j * L::kSubBytes, dst + j * 512);
    }
    bf16_panel_pair(xt, m, nsub, wt, y + rp, ldy, int(std::min<int64_t>(32, r1 - rp)));
  }
  _tile_release();
}

// The types it takes: those the int8 tiles take (AmxTiles::runs), one scale per 32 weights, no min.
bool gemm_bf16_supports(GGMLType t) { return t == GGMLType::Q4_0 || t == GGMLType::Q8_0; }

void gemm_bf16(const WeightView& w, const uint16_t* xt, int64_t m, int64_t r0, int64_t r1, float* y, int64_t ldy) {
  if (w.type == GGMLType::Q8_0) return gemm_bf16_type<Avx512, PackQ8_0<Avx512>>(w, xt, m, r0, r1, y, ldy);
  return gemm_bf16_type<Avx512, PackQ4_0<Avx512>>(w, xt, m, r0, r1, y, ldy);
}

}  // namespace
}  // namespace pe::cpu
