// AVX2 matmul kernels for float weights (F32, F16, BF16): an R x C tile of dot products vectorized
// along k, reduced at the end. Compiled with the AVX2 flags; called only once cpu_path() says so.
#include <immintrin.h>

#include <cstring>

#include "cpu/matmul_kernels.h"

namespace pe::cpu {

namespace {

PE_INLINE __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

PE_INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

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

// Elements [i, k) of a row (fewer than 8), zero-padded to a vector. Element i + l lands in lane l as in
// the main loop, so a row's lane sums, and the result, do not change when k grows by zero-weighted
// elements (attention's P V: decode sums over the visible keys, prefill over all keys with P = 0 beyond).
template <GGMLType T>
PE_INLINE __m256 load_w8_tail(const uint8_t* row, int64_t i, int64_t k) {
  const size_t elem = T == GGMLType::F32 ? 4 : 2;
  alignas(32) uint8_t buf[32] = {};
  std::memcpy(buf, row + elem * i, size_t(k - i) * elem);
  return load_w8<T>(buf, 0);
}

PE_INLINE __m256 load_x8_tail(const float* x, int64_t n) {
  alignas(32) float buf[8] = {};
  std::memcpy(buf, x, size_t(n) * sizeof(float));
  return _mm256_load_ps(buf);
}

template <GGMLType T, int R, int C>
void float_tile(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t c0, float* y, int64_t ldy) {
  const int64_t k = w.cols;
  const uint8_t* rows[R];
  for (int a = 0; a < R; a++) rows[a] = static_cast<const uint8_t*>(w.data) + (r + a) * int64_t(w.row_stride);
  __m256 acc[R][C];
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) acc[a][c] = _mm256_setzero_ps();
  const RowPrefetch next(rows[0] + R * int64_t(w.row_stride), R * int64_t(w.row_stride), k / 8);
  int64_t i = 0;
  for (; i + 8 <= k; i += 8) {
    next.step(i / 8);
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
  if (i < k) {
    __m256 wv[R];
    for (int a = 0; a < R; a++) wv[a] = load_w8_tail<T>(rows[a], i, k);
    for (int c = 0; c < C; c++) {
      const __m256 xv = load_x8_tail(x + (c0 + c) * ldx + i, k - i);
      for (int a = 0; a < R; a++) acc[a][c] = _mm256_fmadd_ps(wv[a], xv, acc[a][c]);
    }
  }
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) y[(c0 + c) * ldy + r + a] = hsum(acc[a][c]);
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

}  // namespace

void gemm_float_avx2(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                float* y, int64_t ldy) {
  switch (w.type) {
    case GGMLType::F32: return gemm_float_type<GGMLType::F32>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    case GGMLType::F16: return gemm_float_type<GGMLType::F16>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    case GGMLType::BF16: return gemm_float_type<GGMLType::BF16>(w, x, ldx, r0, r1, m0, m1, y, ldy);
    default: return;
  }
}

}  // namespace pe::cpu
