// AVX2 matmul kernels for float weights (F32, F16, BF16): an R x C tile of dot products vectorized
// along k, reduced at the end. Compiled with the AVX2 flags; called only once cpu_path() says so.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "cpu/matmul_kernels.h"

namespace pe::cpu {

namespace {

PE_INLINE __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// The lane sums of a, b, c and d: {sum a, sum b, sum c, sum d}. Each by the same tree, ((l0 + l4) +
// (l2 + l6)) + ((l1 + l5) + (l3 + l7)): every tile shape gives a dot product the same bits.
PE_INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
  const __m256 cd = _mm256_add_ps(_mm256_permute2f128_ps(c, d, 0x20), _mm256_permute2f128_ps(c, d, 0x31));
  // Per 128-bit lane: {s0 + s2, s1 + s3} of a (lane 0) or b (lane 1), then of c or d.
  const __m256 t = _mm256_add_ps(_mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm256_shuffle_ps(ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 r = _mm256_hadd_ps(t, t);  // lane 0: {a, c, a, c}, lane 1: {b, d, b, d}
  return _mm_unpacklo_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
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

// PREFETCH: ask for the next R weight rows while this tile runs (decode streams the weights from memory;
// prefill's blocks are already in L2).
template <GGMLType T, int R, int C, bool PREFETCH = true>
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
    if constexpr (PREFETCH) next.step(i / 8);
    __m256 wv[R];
#pragma GCC unroll 8
    for (int a = 0; a < R; a++) wv[a] = load_w8<T>(rows[a], i);
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      __m256 xv = _mm256_loadu_ps(x + (c0 + c) * ldx + i);
      // Loaded once into a register for the R FMAs: GCC would otherwise fold the load into each of them,
      // and R times the loads (two a cycle) then bounded the tile instead of the FMAs.
      asm("" : "+x"(xv));
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
  // The R x C sums four at a time (a tile's reductions took a tenth of its time one by one).
  constexpr int N = R * C, N4 = (N + 3) / 4 * 4;
  __m256 v[N4];
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) v[a * C + c] = acc[a][c];
  for (int j = N; j < N4; j++) v[j] = _mm256_setzero_ps();
  alignas(16) float sums[N4];
#pragma GCC unroll 8
  for (int j = 0; j < N4; j += 4) _mm_store_ps(sums + j, hsum4(v[j], v[j + 1], v[j + 2], v[j + 3]));
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) y[(c0 + c) * ldy + r + a] = sums[a * C + c];
}

// Decode (a few activation rows): 4 weight rows per tile, 1-2 activation rows.
template <GGMLType T, int R>
void float_rows(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  int64_t c = m0;
  for (; c + 2 <= m1; c += 2) float_tile<T, R, 2>(w, x, ldx, r, c, y, ldy);
  if (c < m1) float_tile<T, R, 1>(w, x, ldx, r, c, y, ldy);
}

// Prefill tiles: kPrefillR weight rows x kPrefillC activation rows (see float_prefill).
constexpr int kPrefillR = 2, kPrefillC = 6;

// A tile of R weight rows and n activation rows, 1 <= n <= kPrefillC.
template <GGMLType T, int R, int... C>
PE_INLINE void float_tile_n(int64_t n, const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t c,
                            float* y, int64_t ldy, std::integer_sequence<int, C...>) {
  ((n == C + 1 ? float_tile<T, R, C + 1, false>(w, x, ldx, r, c, y, ldy) : void()), ...);
}

// Prefill (many activation rows): 2 weight rows x 6 activation rows, 12 accumulators of the 16 ymm
// registers, so that each weight vector feeds 6 FMAs and each activation load 2 (decode's 4 x 2 tiles:
// 2 and 4, with every load folded into its FMA, were bound by conversions and loads). A tile's
// activation rows stay in L1 while a block of weight rows that fits in L2 passes over them; F16 and
// BF16 blocks are widened to F32 once per block rather than once per tile (the same floats: the
// conversion is exact): bench_kernels.py --types F16,BF16 --paths avx2 --m 512, Zen 4, builds
// alternated three times, 96-97 -> 100-101 GFLOP/s at one thread, 189-193 -> 197-199 at two.
// SmolLM2 F16, 512 tokens, AMD Zen 4 on this path, 1 / 2 threads: 177 / 369 -> 355 / 593 tok/s
// (llama.cpp's AVX2 build: 333-360 / 626-637). A row's result does not depend on the tile: every dot
// product sums the same lanes in the same order (decode and prefill agree bit for bit).
template <GGMLType T>
void float_prefill(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                   float* y, int64_t ldy) {
  constexpr int R = kPrefillR, C = kPrefillC;
  const int64_t k = w.cols;
  const int64_t block = std::max<int64_t>(R, (int64_t(128) << 10) / int64_t(w.row_stride) / R * R);
  thread_local ScratchBuffer wide_buf;
  for (int64_t b0 = r0; b0 < r1; b0 += block) {
    const int64_t b1 = std::min(r1, b0 + block);
    // F16/BF16: the block's rows widened to F32 once, so the tiles run on F32 loads.
    WeightView blk = w;
    blk.data = const_cast<uint8_t*>(static_cast<const uint8_t*>(w.data)) + b0 * int64_t(w.row_stride);
    if constexpr (T != GGMLType::F32) {
      auto* wide = static_cast<float*>(wide_buf.get(size_t((b1 - b0) * k) * sizeof(float)));
      for (int64_t r = b0; r < b1; r++) {
        const uint8_t* src = static_cast<const uint8_t*>(w.data) + r * int64_t(w.row_stride);
        float* dst = wide + (r - b0) * k;
        int64_t i = 0;
        for (; i + 8 <= k; i += 8) _mm256_storeu_ps(dst + i, load_w8<T>(src, i));
        if (i < k) {
          alignas(32) float tail[8];
          _mm256_store_ps(tail, load_w8_tail<T>(src, i, k));
          std::memcpy(dst + i, tail, size_t(k - i) * sizeof(float));
        }
      }
      blk.data = wide, blk.row_stride = size_t(k) * sizeof(float), blk.type = GGMLType::F32;
    }
    constexpr GGMLType TB = GGMLType::F32;
    for (int64_t c = m0; c < m1; c += C) {
      const int64_t n = std::min<int64_t>(C, m1 - c);
      int64_t r = b0;
      // Tiles index rows from the block's start; their outputs go to rows r of y.
      for (; r + R <= b1; r += R)
        float_tile_n<TB, R>(n, blk, x, ldx, r - b0, c, y + b0, ldy, std::make_integer_sequence<int, C>{});
      for (; r < b1; r++)
        float_tile_n<TB, 1>(n, blk, x, ldx, r - b0, c, y + b0, ldy, std::make_integer_sequence<int, C>{});
    }
  }
}

template <GGMLType T>
void gemm_float_type(const WeightView& w, const float* x, int64_t ldx, int64_t r0, int64_t r1, int64_t m0, int64_t m1,
                     float* y, int64_t ldy) {
  if (m1 - m0 >= kPrefillC) return float_prefill<T>(w, x, ldx, r0, r1, m0, m1, y, ldy);
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
