// AVX-512 matmul kernels (F, BW, VL, DQ, VNNI). This file is compiled with those ISA flags and is only
// called once cpu_path() says the CPU has them.
//
// Quantized weights: a "panel" is 16 weight rows. Packing a panel's block transposes it so that one
// zmm holds 4 consecutive elements (u bytes, see quant_blocks.h) of each of the 16 rows: one
// vpdpbusd against 4 activation bytes broadcast to every lane then advances 16 row dot products at
// once, and each sub-block ends with a single convert + scale + accumulate for all 16 rows, with no
// horizontal reductions. Prefill packs whole panels once and streams every activation row over them
// (a 32-row x 6-activation-row register tile); decode packs block by block into L1 and uses it at once.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "cpu/matmul_kernels.h"

// GCC 12 flags the intrinsics' own _mm512_undefined_* placeholders.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace pe::cpu {

namespace {

constexpr int kPanel = 16;     // weight rows per panel: one int32 lane each
constexpr int kMaxSmallM = 3;  // up to this many activation rows, pack block by block (no panel reuse)
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

// ---------------------------------------------------------------------------------------------------
// Packed panel layout, per sub-block of S = 4G elements:
//   G x 64 bytes  u of elements 4g..4g+3 of rows 0..15 (row i in int32 lane i)
//   16 floats     scale of each row
//   16 floats     min of each row (types with a min only)

template <int G, bool MIN>
struct PanelLayout {
  static constexpr int kSubBytes = G * 64 + (MIN ? 128 : 64);
};

// Transposes 4x4 int32 blocks within each 128-bit lane.
PE_INLINE void transpose4x4(__m512i& a0, __m512i& a1, __m512i& a2, __m512i& a3) {
  const __m512i t0 = _mm512_unpacklo_epi32(a0, a1), t1 = _mm512_unpackhi_epi32(a0, a1);
  const __m512i t2 = _mm512_unpacklo_epi32(a2, a3), t3 = _mm512_unpackhi_epi32(a2, a3);
  a0 = _mm512_unpacklo_epi64(t0, t2);
  a1 = _mm512_unpackhi_epi64(t0, t2);
  a2 = _mm512_unpacklo_epi64(t1, t3);
  a3 = _mm512_unpackhi_epi64(t1, t3);
}

// t[g] (g < 4): int32 lane i = bytes 4g..4g+3 of the 16 bytes at r[i] + off.
// Row 4j+k goes to 128-bit lane j of register k, so that the in-lane transpose leaves rows in order.
PE_INLINE void load_transpose_16x16(const uint8_t* const* r, int64_t off, __m512i t[4]) {
  for (int k = 0; k < 4; k++) {
    __m512i a = _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r[k] + off)));
    a = _mm512_inserti32x4(a, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[4 + k] + off)), 1);
    a = _mm512_inserti32x4(a, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[8 + k] + off)), 2);
    a = _mm512_inserti32x4(a, _mm_loadu_si128(reinterpret_cast<const __m128i*>(r[12 + k] + off)), 3);
    t[k] = a;
  }
  transpose4x4(t[0], t[1], t[2], t[3]);
}

PE_INLINE __m512 load_f16_x16(const uint8_t* const* r, int64_t off) {
  alignas(32) uint16_t h[16];
  for (int i = 0; i < 16; i++) std::memcpy(&h[i], r[i] + off, 2);
  return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(h)));
}

PE_INLINE __m512i load_u32_x16(const uint8_t* const* r, int64_t off) {
  alignas(64) uint32_t h[16];
  for (int i = 0; i < 16; i++) std::memcpy(&h[i], r[i] + off, 4);
  return _mm512_load_si512(h);
}

PE_INLINE void store_u(uint8_t* dst, int g, __m512i v) { _mm512_store_si512(dst + 64 * g, v); }

// Q4_0-style nibbles: groups 0..3 are the low nibbles of bytes 0..15, groups 4..7 the high ones.
PE_INLINE void nibble_groups(const __m512i t[4], __m512i out[8]) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < 4; g++) {
    out[g] = _mm512_and_si512(t[g], m4);
    out[g + 4] = _mm512_and_si512(_mm512_srli_epi16(t[g], 4), m4);
  }
}

// Adds 16 to the bytes of group g (elements 4g..4g+3) whose bit in the 32-bit qh of their row is set.
PE_INLINE __m512i add_q5_high_bits(__m512i u, __m512i qh, int g) {
  // Each byte of lane i picks byte g/2 of qh[i]; the test keeps bit 4g + byte index.
  const __m512i idx = _mm512_add_epi8(
      _mm512_set_epi32(0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000,
                       0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000, 0x0C0C0C0C, 0x08080808, 0x04040404, 0x00000000),
      _mm512_set1_epi8(char(g / 2)));
  const __m512i bytes = _mm512_shuffle_epi8(qh, idx);
  const __m512i bits = _mm512_set1_epi32((g & 1) ? int32_t(0x80402010) : 0x08040201);
  const __mmask64 k = _mm512_test_epi8_mask(bytes, bits);
  return _mm512_mask_add_epi8(u, k, u, _mm512_set1_epi8(0x10));
}

struct PackQ4_0 {
  static constexpr GGMLType kType = GGMLType::Q4_0;
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kBytes = sizeof(block_q4_0);
  static constexpr bool kMin = false;
  static PE_INLINE void pack(const uint8_t* const* r, int64_t off, uint8_t* dst) {
    __m512i t[4], u[8];
    load_transpose_16x16(r, off + 2, t);
    nibble_groups(t, u);
    for (int g = 0; g < 8; g++) store_u(dst, g, u[g]);
    _mm512_store_ps(dst + 512, load_f16_x16(r, off));
  }
};

struct PackQ4_1 {
  static constexpr GGMLType kType = GGMLType::Q4_1;
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kBytes = sizeof(block_q4_1);
  static constexpr bool kMin = true;
  static PE_INLINE void pack(const uint8_t* const* r, int64_t off, uint8_t* dst) {
    __m512i t[4], u[8];
    load_transpose_16x16(r, off + 4, t);
    nibble_groups(t, u);
    for (int g = 0; g < 8; g++) store_u(dst, g, u[g]);
    _mm512_store_ps(dst + 512, load_f16_x16(r, off));
    _mm512_store_ps(dst + 576, load_f16_x16(r, off + 2));
  }
};

template <bool Q51>
struct PackQ5 {
  static constexpr GGMLType kType = Q51 ? GGMLType::Q5_1 : GGMLType::Q5_0;
  static constexpr int kBlock = 32, kSub = 32, kG = 8;
  static constexpr int kBytes = Q51 ? sizeof(block_q5_1) : sizeof(block_q5_0);
  static constexpr bool kMin = Q51;
  static PE_INLINE void pack(const uint8_t* const* r, int64_t off, uint8_t* dst) {
    constexpr int qh_off = Q51 ? 4 : 2;
    __m512i t[4], u[8];
    load_transpose_16x16(r, off + qh_off + 4, t);
    nibble_groups(t, u);
    const __m512i qh = load_u32_x16(r, off + qh_off);
    for (int g = 0; g < 8; g++) store_u(dst, g, add_q5_high_bits(u[g], qh, g));
    _mm512_store_ps(dst + 512, load_f16_x16(r, off));
    if (Q51) _mm512_store_ps(dst + 576, load_f16_x16(r, off + 2));
  }
};

struct PackQ8_0 {
  static constexpr GGMLType kType = GGMLType::Q8_0;
  static constexpr int kBlock = 32, kSub = 32, kG = 8, kBytes = sizeof(block_q8_0);
  static constexpr bool kMin = false;
  static PE_INLINE void pack(const uint8_t* const* r, int64_t off, uint8_t* dst) {
    const __m512i flip = _mm512_set1_epi8(char(0x80));  // int8 -> u = q + 128
    __m512i t[4];
    load_transpose_16x16(r, off + 2, t);
    for (int g = 0; g < 4; g++) store_u(dst, g, _mm512_xor_si512(t[g], flip));
    load_transpose_16x16(r, off + 18, t);
    for (int g = 0; g < 4; g++) store_u(dst, g + 4, _mm512_xor_si512(t[g], flip));
    _mm512_store_ps(dst + 512, load_f16_x16(r, off));
  }
};

// Any type through the scalar unpacker (K-quants until they get SIMD packers).
template <GGMLType T, int Block, int Sub, bool Min, int Bytes>
struct PackScalar {
  static constexpr GGMLType kType = T;
  static constexpr int kBlock = Block, kSub = Sub, kG = Sub / 4, kBytes = Bytes;
  static constexpr bool kMin = Min;
  static void pack(const uint8_t* const* r, int64_t off, uint8_t* dst) {
    constexpr int kSubBytes = PanelLayout<kG, kMin>::kSubBytes;
    const QuantScheme& s = *quant_scheme(T);
    alignas(64) uint8_t u[kPanel][Block];
    float sc[kPanel][Block / Sub], mn[kPanel][Block / Sub];
    for (int i = 0; i < kPanel; i++) unpack_block(s, r[i] + off, u[i], sc[i], mn[i]);
    for (int j = 0; j < Block / Sub; j++) {
      uint8_t* d = dst + j * kSubBytes;
      for (int g = 0; g < kG; g++)
        for (int i = 0; i < kPanel; i++) std::memcpy(d + 64 * g + 4 * i, &u[i][j * Sub + 4 * g], 4);
      float* f = reinterpret_cast<float*>(d + 64 * kG);
      for (int i = 0; i < kPanel; i++) f[i] = sc[i][j];
      if (Min)
        for (int i = 0; i < kPanel; i++) f[16 + i] = mn[i][j];
    }
  }
};

using PackQ2_K = PackScalar<GGMLType::Q2_K, QK_K, 16, true, sizeof(block_q2_K)>;
using PackQ3_K = PackScalar<GGMLType::Q3_K, QK_K, 16, false, sizeof(block_q3_K)>;
using PackQ4_K = PackScalar<GGMLType::Q4_K, QK_K, 32, true, sizeof(block_q4_K)>;
using PackQ5_K = PackScalar<GGMLType::Q5_K, QK_K, 32, true, sizeof(block_q5_K)>;
using PackQ6_K = PackScalar<GGMLType::Q6_K, QK_K, 16, false, sizeof(block_q6_K)>;

// ---------------------------------------------------------------------------------------------------
// Register tile: NP panels (16 rows each) x NC activation rows over nsub sub-blocks.
// pan: first sub-block of panel 0 (panel p at pan + p * pstride); xq / xs: first element / sub-block
// entry of activation row 0 (row c at + c * ldq / + c * ldxs).

template <int G, bool MIN, int NP, int NC>
PE_INLINE void tile(const uint8_t* pan, int64_t pstride, int64_t nsub, const int8_t* xq, int64_t ldq, const XSub* xs,
                    int64_t ldxs, __m512 (&acc)[NP][NC]) {
  constexpr int kSubBytes = PanelLayout<G, MIN>::kSubBytes;
  for (int64_t j = 0; j < nsub; j++, pan += kSubBytes, xq += 4 * G, xs++) {
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

// Writes acc (NP panels x NC activation rows) to y rows c = 0..NC-1, columns row0 + 16p + lane,
// keeping only the first nrows weight rows.
template <int NP, int NC>
PE_INLINE void store_tile(const __m512 (&acc)[NP][NC], float* y, int64_t ldy, int64_t row0, int64_t nrows) {
#pragma GCC unroll 4
  for (int p = 0; p < NP; p++) {
    const int64_t n = nrows - kPanel * p;
    if (n <= 0) break;
#pragma GCC unroll 8
    for (int c = 0; c < NC; c++) {
      float* dst = y + c * ldy + row0 + kPanel * p;
      if (n >= kPanel) _mm512_storeu_ps(dst, acc[p][c]);
      else _mm512_mask_storeu_ps(dst, __mmask16((1u << n) - 1), acc[p][c]);
    }
  }
}

// Row pointers of the panel starting at row rp; rows past r1 repeat the last one (their results are
// computed but never stored).
PE_INLINE void panel_rows(const WeightView& w, int64_t rp, int64_t r1, const uint8_t* rows[kPanel]) {
  const auto* base = static_cast<const uint8_t*>(w.data);
  for (int i = 0; i < kPanel; i++) rows[i] = base + std::min(rp + i, r1 - 1) * int64_t(w.row_stride);
}

// The tile as a function of its own, with the accumulators in memory: the decode path calls it once
// per block, and sharing it between types keeps the number of instantiations (and compile time) low.
template <int G, bool MIN, int NP, int NC>
__attribute__((noinline)) void tile_mem(const uint8_t* pan, int64_t pstride, int64_t nsub, const int8_t* xq,
                                        int64_t ldq, const XSub* xs, int64_t ldxs, __m512* acc_mem) {
  __m512 acc[NP][NC];
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc[p][c] = acc_mem[p * NC + c];
  tile<G, MIN, NP, NC>(pan, pstride, nsub, xq, ldq, xs, ldxs, acc);
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc_mem[p * NC + c] = acc[p][c];
}

// Few activation rows (decode): pack NP panels one block at a time into an L1 buffer and use it at once.
template <class P, int NP, int NC>
void gemm_small(const WeightView& w, const QuantizedX& x, int64_t rp, int64_t r1, int64_t m0, float* y,
                int64_t ldy) {
  constexpr int kSubs = P::kBlock / P::kSub;
  constexpr int kPacked = kSubs * PanelLayout<P::kG, P::kMin>::kSubBytes;
  alignas(64) uint8_t buf[NP * kPacked];
  const uint8_t* rows[NP][kPanel];
  for (int p = 0; p < NP; p++) panel_rows(w, std::min(rp + kPanel * p, r1 - 1), r1, rows[p]);
  __m512 acc[NP][NC];
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc[p][c] = _mm512_setzero_ps();
  const int64_t nblk = w.cols / P::kBlock;
  const int8_t* xq = x.q + m0 * x.ldq;
  const XSub* xs = x.sub + m0 * x.ldsub;
  for (int64_t b = 0; b < nblk; b++) {
    for (int p = 0; p < NP; p++) P::pack(rows[p], b * P::kBytes, buf + p * kPacked);
    tile_mem<P::kG, P::kMin, NP, NC>(buf, kPacked, kSubs, xq + b * P::kBlock, x.ldq, xs + b * kSubs, x.ldsub,
                                     &acc[0][0]);
  }
  store_tile<NP, NC>(acc, y + m0 * ldy, ldy, rp, r1 - rp);
}

template <class P, int NC>
void gemm_small_rows(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, float* y,
                     int64_t ldy) {
  constexpr int NP = 4;
  int64_t rp = r0;
  for (; rp + NP * kPanel <= r1; rp += NP * kPanel) gemm_small<P, NP, NC>(w, x, rp, rp + NP * kPanel, m0, y, ldy);
  for (; rp < r1; rp += kPanel) gemm_small<P, 1, NC>(w, x, rp, std::min(r1, rp + kPanel), m0, y, ldy);
}

// Many activation rows: pack two whole panels, then run every activation row tile over them.
template <int G, bool MIN, int NP, int NC>
void run_tile(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x, int64_t c0, float* y,
              int64_t ldy, int64_t rp, int64_t nrows) {
  __m512 acc[NP][NC];
  for (int p = 0; p < NP; p++)
    for (int c = 0; c < NC; c++) acc[p][c] = _mm512_setzero_ps();
  tile<G, MIN, NP, NC>(pan, pstride, nsub, x.q + c0 * x.ldq, x.ldq, x.sub + c0 * x.ldsub, x.ldsub, acc);
  store_tile<NP, NC>(acc, y + c0 * ldy, ldy, rp, nrows);
}

template <int G, bool MIN, int NP>
__attribute__((noinline)) void run_tiles(const uint8_t* pan, int64_t pstride, int64_t nsub, const QuantizedX& x, int64_t m0, int64_t m1,
               float* y, int64_t ldy, int64_t rp, int64_t nrows) {
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
}

template <class P>
void gemm_large(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  constexpr int kSubs = P::kBlock / P::kSub;
  constexpr int kPacked = kSubs * PanelLayout<P::kG, P::kMin>::kSubBytes;
  const int64_t nblk = w.cols / P::kBlock;
  const int64_t pstride = nblk * kPacked;
  thread_local ScratchBuffer scratch;
  auto* buf = static_cast<uint8_t*>(scratch.get(size_t(2 * pstride)));
  const uint8_t* rows[kPanel];
  for (int64_t rp = r0; rp < r1; rp += 2 * kPanel) {
    const int np = r1 - rp > kPanel ? 2 : 1;
    for (int p = 0; p < np; p++) {
      panel_rows(w, rp + kPanel * p, r1, rows);
      for (int64_t b = 0; b < nblk; b++) P::pack(rows, b * P::kBytes, buf + p * pstride + b * kPacked);
    }
    const int64_t nsub = nblk * kSubs;
    if (np == 2) run_tiles<P::kG, P::kMin, 2>(buf, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
    else run_tiles<P::kG, P::kMin, 1>(buf, pstride, nsub, x, m0, m1, y, ldy, rp, r1 - rp);
  }
}

template <class P>
void gemm_type(const WeightView& w, const QuantizedX& x, int64_t r0, int64_t r1, int64_t m0, int64_t m1, float* y,
               int64_t ldy) {
  switch (m1 - m0) {
    case 1: gemm_small_rows<P, 1>(w, x, r0, r1, m0, y, ldy); return;
    case 2: gemm_small_rows<P, 2>(w, x, r0, r1, m0, y, ldy); return;
    case 3: gemm_small_rows<P, 3>(w, x, r0, r1, m0, y, ldy); return;
    default: gemm_large<P>(w, x, r0, r1, m0, m1, y, ldy); return;
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
// Float weights: an R x C tile of dot products, vectorized along k, reduced once at the end.

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

template <GGMLType T, int R, int C>
void float_tile(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t c0, float* y, int64_t ldy) {
  const int64_t k = w.cols;
  const uint8_t* rows[R];
  for (int i = 0; i < R; i++) rows[i] = static_cast<const uint8_t*>(w.data) + (r + i) * int64_t(w.row_stride);
  __m512 acc[R][C];
  for (int i = 0; i < R; i++)
    for (int c = 0; c < C; c++) acc[i][c] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[R];
#pragma GCC unroll 8
    for (int a = 0; a < R; a++) wv[a] = load_w16<T>(rows[a], i);
#pragma GCC unroll 8
    for (int c = 0; c < C; c++) {
      const __m512 xv = _mm512_loadu_ps(x + (c0 + c) * ldx + i);
#pragma GCC unroll 8
      for (int a = 0; a < R; a++) acc[a][c] = _mm512_fmadd_ps(wv[a], xv, acc[a][c]);
    }
  }
  if (i < k) {
    const __mmask16 m = __mmask16((1u << (k - i)) - 1);
    __m512 wv[R];
    for (int a = 0; a < R; a++) wv[a] = load_w16_tail<T>(rows[a], i, m);
    for (int c = 0; c < C; c++) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + (c0 + c) * ldx + i);
      for (int a = 0; a < R; a++) acc[a][c] = _mm512_fmadd_ps(wv[a], xv, acc[a][c]);
    }
  }
  for (int a = 0; a < R; a++)
    for (int c = 0; c < C; c++) y[(c0 + c) * ldy + r + a] = _mm512_reduce_add_ps(acc[a][c]);
}

template <GGMLType T, int R>
void float_rows(const WeightView& w, const float* x, int64_t ldx, int64_t r, int64_t m0, int64_t m1, float* y,
                int64_t ldy) {
  int64_t c = m0;
  for (; c + 6 <= m1; c += 6) float_tile<T, R, 6>(w, x, ldx, r, c, y, ldy);
  switch (m1 - c) {
    case 1: float_tile<T, R, 1>(w, x, ldx, r, c, y, ldy); break;
    case 2: float_tile<T, R, 2>(w, x, ldx, r, c, y, ldy); break;
    case 3: float_tile<T, R, 3>(w, x, ldx, r, c, y, ldy); break;
    case 4: float_tile<T, R, 4>(w, x, ldx, r, c, y, ldy); break;
    case 5: float_tile<T, R, 5>(w, x, ldx, r, c, y, ldy); break;
    default: break;
  }
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

const MatmulKernels kAvx512Kernels = {quantize_x, gemm_quant, gemm_float};

}  // namespace pe::cpu
