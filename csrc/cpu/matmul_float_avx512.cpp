// AVX-512 matmul kernels for float weights (F32, F16, BF16). Compiled with the AVX-512 flags; called
// only once cpu_path() says the CPU has them.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/matmul_kernels.h"

// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu {

namespace {

constexpr int kPanel = 16;  // weight rows per transposed panel

// Writes 16-row results for NC activation rows to y[c * ldy + row0 + lane], keeping the first nrows.
template <int NC>
inline void store_panel(const __m512 (&acc)[NC], float* y, int64_t ldy, int64_t row0, int64_t nrows) {
  for (int c = 0; c < NC; c++) {
    float* dst = y + c * ldy + row0;
    if (nrows >= kPanel) _mm512_storeu_ps(dst, acc[c]);
    else _mm512_mask_storeu_ps(dst, __mmask16((1u << nrows) - 1), acc[c]);
  }
}

// Float weights as 16 floats.
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
  // Few activation rows: the AVX2 kernel's 8-lane dot products. Converting 16 fp16/bf16 weights per
  // instruction streamed 19-23 GB/s on Zen 4 (its 512-bit conversions are slow), 8 at a time 32 GB/s.
  gemm_float_avx2(w, x, ldx, r0, r1, m0, m1, y, ldy);
}

}  // namespace

void gemm_float_avx512(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                float* y, int64_t ldy) {
  switch (w.type) {
    case GGMLType::F32: return gemm_float_type<GGMLType::F32>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    case GGMLType::F16: return gemm_float_type<GGMLType::F16>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    case GGMLType::BF16: return gemm_float_type<GGMLType::BF16>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    default: return;
  }
}

}  // namespace pe::cpu
