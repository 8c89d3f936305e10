// Integer dot products of quantized weight chunks with 8-bit activations, for the CUDA decode GEMV
// (matmul.cu, gemv_int_kernel) and for its host mirror (bindings_cuda_quant.cpp, tested on machines
// without a GPU by tests/test_cuda_host_quant.py). Compiled by nvcc and by the host compiler: no
// CUDA types here.
//
// Why: decoding a weight to float costs an int-to-float conversion per element (a quarter-rate
// instruction on NVIDIA GPUs) plus a multiply and an FMA; at batch 1 that made the GEMV bound by
// instructions, not by memory (~0.9 TB/s of an H200's 4.8). Here x is rounded to 8 bits per
// 32-element chunk, as the CPU backend does for every quantized type, and each 4 weights cost one
// `dp4a` (four 8-bit products summed into an int32) after a few bit operations.
//
// Every quantized type's chunk (32 elements, never straddling two blocks) is written as
//     w[l] = scale[h] * q[l] + offset[h],   h = l / 16 (the chunk's two halves),
// with q[l] a small integer held as a signed byte. For most types both halves share one scale
// (Q2_K, Q3_K and Q6_K have 16-element sub-blocks). An x chunk is x[l] ~ d * xq[l] with
// d = max|x| / 127, so
//     sum_l w[l] x[l] ~ d * (scale[0] * S0 + scale[1] * S1) + offset[0] * D0 + offset[1] * D1,
// where S_h = sum over half h of q[l] xq[l] (integers, exact) and D_h = d * sum over half h of xq[l]
// (precomputed once per x chunk, in its XRecord).
#pragma once
#include <math.h>
#include <stdint.h>

#include "cuda/host_device.h"
#include "cuda/quant_blocks.cuh"
#include "ggml_types.h"

namespace pe::cuda {

// One quantized 32-element chunk of x as the GEMV reads it: 48 bytes, three 16-byte loads. Lanes
// reading consecutive records hit distinct shared-memory / L1 banks (48-byte stride).
struct alignas(16) XRecord {
  int8_t q[32];   // xq[l]
  float d;        // max|x| / 127 (0 for an all-zero chunk; NaN / inf when x has them)
  float dsum[2];  // d * sum of xq over each 16-element half
  float pad;
};
static_assert(sizeof(XRecord) == 48, "XRecord is three 16-byte words");

// 127 / amax, the factor that rounds x to xq; 0 for an all-zero chunk.
PE_HD float x_quant_factor(float amax) { return amax > 0.0f ? 127.0f / amax : 0.0f; }

// xq for one element: v * factor rounded to nearest, ties to even (|xq| <= 127); 0 for NaN.
PE_HD int x_quant_value(float v, float factor) {
#ifdef __CUDA_ARCH__
  return __float2int_rn(v * factor);  // NaN converts to 0
#else
  const float r = v * factor;
  return r == r ? int(nearbyintf(r)) : 0;
#endif
}

// The XRecord of one chunk of x, as quantize_x_kernel computes it lane by lane (host mirror).
PE_HD void quantize_x_chunk(const float (&x)[32], XRecord& rec) {
  float amax = 0.0f;
  for (int l = 0; l < 32; l++) {
    const float a = fabsf(x[l]);
    amax = (a > amax || a != a) ? a : amax;  // NaN wins, as the kernel's integer max of the bits does
  }
  const float factor = x_quant_factor(amax);
  int sum[2] = {0, 0};
  for (int l = 0; l < 32; l++) {
    const int q = x_quant_value(x[l], factor);
    rec.q[l] = int8_t(q);
    sum[l / 16] += q;
  }
  rec.d = amax / 127.0f;
  rec.dsum[0] = rec.d * float(sum[0]);
  rec.dsum[1] = rec.d * float(sum[1]);
  rec.pad = 0.0f;
}

// Four signed 8-bit products summed into c.
PE_HD int dp4a(uint32_t a, uint32_t b, int c) {
#ifdef __CUDA_ARCH__
  return __dp4a(int(a), int(b), c);
#else
  for (int i = 0; i < 4; i++) c += sign_extend8((a >> (8 * i)) & 0xffu) * sign_extend8((b >> (8 * i)) & 0xffu);
  return c;
#endif
}

// A weight chunk in the form above. q[i] holds elements 4i..4i+3, one signed byte each.
struct IntChunk {
  uint32_t q[8];
  float scale[2];
  float offset[2];
};

// Types whose two halves can differ in scale (16-element sub-blocks).
PE_HD constexpr bool int_chunk_has_halves(GGMLType t) {
  return t == GGMLType::Q2_K || t == GGMLType::Q3_K || t == GGMLType::Q6_K;
}

// Bits 0..3 of b moved to bit 4 of bytes 0..3 (the fifth bit of four Q5 quants).
PE_HD uint32_t spread_bit4(uint32_t b) {
  return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

// Q4_0-style quants: elements 0..15 the low nibbles of the 16 bytes in qs, 16..31 the high ones.
PE_HD void split_nibbles(const uint32_t (&qs)[4], IntChunk& o) {
  PE_UNROLL
  for (int i = 0; i < 4; i++) {
    o.q[i] = qs[i] & 0x0f0f0f0fu;
    o.q[i + 4] = (qs[i] >> 4) & 0x0f0f0f0fu;
  }
}

PE_HD void set_scale(IntChunk& o, float scale, float offset) {
  o.scale[0] = o.scale[1] = scale;
  o.offset[0] = o.offset[1] = offset;
}

// ---- per-type chunk decoders (the layouts are those of quant_blocks.cuh's float decoders) ------------

PE_HD void int_chunk_q4_0(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + c * 18;
  const float d = load_half(blk);
  uint32_t qs[4];
  load_words(blk + 2, qs);
  split_nibbles(qs, o);
  set_scale(o, d, -8.0f * d);
}

PE_HD void int_chunk_q4_1(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + c * 20;
  uint32_t qs[4];
  load_words(blk + 4, qs);
  split_nibbles(qs, o);
  set_scale(o, load_half(blk), load_half(blk + 2));
}

template <bool kHasMin>
PE_HD void int_chunk_q5(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + c * (kHasMin ? 24 : 22);
  const float d = load_half(blk);
  const uint8_t* qh_p = blk + (kHasMin ? 4 : 2);
  const uint32_t qh = load_u32_a2(qh_p);
  uint32_t qs[4];
  load_words(qh_p + 4, qs);
  split_nibbles(qs, o);
  PE_UNROLL
  for (int i = 0; i < 4; i++) {
    o.q[i] |= spread_bit4(qh >> (4 * i));
    o.q[i + 4] |= spread_bit4(qh >> (16 + 4 * i));
  }
  set_scale(o, d, kHasMin ? load_half(blk + 2) : -16.0f * d);
}

PE_HD void int_chunk_q8_0(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + c * 34;
  load_words(blk + 2, o.q);
  set_scale(o, load_half(blk), 0.0f);
}

PE_HD void int_chunk_q2_K(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + (c >> 3) * 84;
  const int ci = int(c & 7), n = ci >> 2, j = ci & 3;
  const float d = load_half(blk + 80), dmin = load_half(blk + 82);
  uint32_t qs[8];
  load_words(blk + 16 + 32 * n, qs);
  PE_UNROLL
  for (int i = 0; i < 8; i++) o.q[i] = (qs[i] >> (2 * j)) & 0x03030303u;
  PE_UNROLL
  for (int h = 0; h < 2; h++) {
    const uint32_t sc = blk[2 * ci + h];
    o.scale[h] = d * float(sc & 0xfu);
    o.offset[h] = -(dmin * float(sc >> 4));
  }
}

PE_HD void int_chunk_q3_K(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + (c >> 3) * 110;
  const int ci = int(c & 7), n = ci >> 2, j = ci & 3;
  const float d = load_half(blk + 108);
  const uint8_t* scales = blk + 96;
  uint32_t hmask[8], qs[8];
  load_words(blk, hmask);
  load_words(blk + 32 + 32 * n, qs);
  PE_UNROLL
  for (int i = 0; i < 8; i++)
    o.q[i] = ((qs[i] >> (2 * j)) & 0x03030303u) | (((hmask[i] >> (4 * n + j)) & 0x01010101u) << 2);
  PE_UNROLL
  for (int h = 0; h < 2; h++) {
    o.scale[h] = d * float(q3_K_scale(scales, 2 * ci + h));
    o.offset[h] = -4.0f * o.scale[h];
  }
}

template <bool kQ5>
PE_HD void int_chunk_q45_K(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + (c >> 3) * (kQ5 ? 176 : 144);
  const int ci = int(c & 7);
  uint32_t sc, mn;
  k4_scale_min(blk + 4, ci, sc, mn);
  uint32_t qs[8];
  load_words(blk + (kQ5 ? 48 : 16) + 32 * (ci >> 1), qs);
  const int shift = 4 * (ci & 1);
  PE_UNROLL
  for (int i = 0; i < 8; i++) o.q[i] = (qs[i] >> shift) & 0x0f0f0f0fu;
  if (kQ5) {
    uint32_t qh[8];
    load_words(blk + 16, qh);
    PE_UNROLL
    for (int i = 0; i < 8; i++) o.q[i] |= ((qh[i] >> ci) & 0x01010101u) << 4;
  }
  set_scale(o, load_half(blk) * float(sc), -(load_half(blk + 2) * float(mn)));
}

PE_HD void int_chunk_q6_K(const uint8_t* row, int64_t c, IntChunk& o) {
  const uint8_t* blk = row + (c >> 3) * 210;
  const int ci = int(c & 7), n = ci >> 2, k = ci & 3;
  const float d = load_half(blk + 208);
  uint32_t ql[8], qh[8];
  load_words(blk + 64 * n + 32 * (k & 1), ql);
  load_words(blk + 128 + 32 * n, qh);
  const int shift = 4 * (k >> 1);
  PE_UNROLL
  for (int i = 0; i < 8; i++) o.q[i] = ((ql[i] >> shift) & 0x0f0f0f0fu) | (((qh[i] >> (2 * k)) & 0x03030303u) << 4);
  PE_UNROLL
  for (int h = 0; h < 2; h++) {
    o.scale[h] = d * float(sign_extend8(blk[192 + 2 * ci + h]));
    o.offset[h] = -32.0f * o.scale[h];
  }
}

// Chunk c of a row of quantized type T (every chunk of such a row is whole).
template <GGMLType T>
PE_HD void int_chunk(const uint8_t* row, int64_t c, IntChunk& o) {
  if constexpr (T == GGMLType::Q4_0) int_chunk_q4_0(row, c, o);
  else if constexpr (T == GGMLType::Q4_1) int_chunk_q4_1(row, c, o);
  else if constexpr (T == GGMLType::Q5_0) int_chunk_q5<false>(row, c, o);
  else if constexpr (T == GGMLType::Q5_1) int_chunk_q5<true>(row, c, o);
  else if constexpr (T == GGMLType::Q8_0) int_chunk_q8_0(row, c, o);
  else if constexpr (T == GGMLType::Q2_K) int_chunk_q2_K(row, c, o);
  else if constexpr (T == GGMLType::Q3_K) int_chunk_q3_K(row, c, o);
  else if constexpr (T == GGMLType::Q4_K) int_chunk_q45_K<false>(row, c, o);
  else if constexpr (T == GGMLType::Q5_K) int_chunk_q45_K<true>(row, c, o);
  else {
    static_assert(T == GGMLType::Q6_K, "int_chunk: a float type has no integer decoder");
    int_chunk_q6_K(row, c, o);
  }
}

// The same for a type known at run time (host code and tests); false for the float types.
PE_HD bool int_chunk(GGMLType t, const uint8_t* row, int64_t c, IntChunk& o) {
  switch (t) {
    case GGMLType::Q4_0: int_chunk<GGMLType::Q4_0>(row, c, o); return true;
    case GGMLType::Q4_1: int_chunk<GGMLType::Q4_1>(row, c, o); return true;
    case GGMLType::Q5_0: int_chunk<GGMLType::Q5_0>(row, c, o); return true;
    case GGMLType::Q5_1: int_chunk<GGMLType::Q5_1>(row, c, o); return true;
    case GGMLType::Q8_0: int_chunk<GGMLType::Q8_0>(row, c, o); return true;
    case GGMLType::Q2_K: int_chunk<GGMLType::Q2_K>(row, c, o); return true;
    case GGMLType::Q3_K: int_chunk<GGMLType::Q3_K>(row, c, o); return true;
    case GGMLType::Q4_K: int_chunk<GGMLType::Q4_K>(row, c, o); return true;
    case GGMLType::Q5_K: int_chunk<GGMLType::Q5_K>(row, c, o); return true;
    case GGMLType::Q6_K: int_chunk<GGMLType::Q6_K>(row, c, o); return true;
    default: return false;
  }
}

// sum_l w[l] x[l] for a weight chunk and an x chunk given as its quants (8 words) and its record's
// d and dsum.
template <bool kHalves>
PE_HD float dot_chunk(const IntChunk& w, const uint32_t (&xq)[8], float d, float dsum0, float dsum1) {
  int s0 = 0, s1 = 0;
  PE_UNROLL
  for (int i = 0; i < 4; i++) {
    s0 = dp4a(w.q[i], xq[i], s0);
    s1 = dp4a(w.q[i + 4], xq[i + 4], s1);
  }
  if (kHalves) return d * (w.scale[0] * float(s0) + w.scale[1] * float(s1)) + w.offset[0] * dsum0 + w.offset[1] * dsum1;
  return d * w.scale[0] * float(s0 + s1) + w.offset[0] * (dsum0 + dsum1);
}

}  // namespace pe::cuda
