// Dequantisation of ggml's blocks, 32 elements at a time, for the CUDA kernels (matmul.cu,
// get_rows.cu) and for their host mirror (bindings_cuda_quant.cpp, tested on machines without a GPU
// by tests/test_cuda_host_quant.py). Compiled by nvcc and by the host compiler: no CUDA types here.
//
// The unit is the "chunk": elements 32j..32j+31 of a row. Every weight type splits into chunks
// without a chunk straddling two blocks (blocks are 32 or 256 elements), so a kernel can hand one
// chunk to one thread. Results are bit-identical to cpu::dequantize_row_ref (and so to gguf-py): the
// same float formulas, with products and sums rounded separately (never fused; see mul_rn).
//
// Alignment: every fp16 field and every run of quant bytes in a ggml block starts at an even byte
// offset and every block size is even, so with a 2-byte aligned row all loads here are 16-bit
// loads of aligned addresses (F32 rows need 4-byte alignment). The host side of the kernels checks
// that before launching.
#pragma once
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "cuda/host_device.h"
#include "ggml_types.h"

#if defined(__CUDA_ARCH__)
#define PE_UNROLL _Pragma("unroll")
#else
#define PE_UNROLL
#endif

// The host compiler must not fuse d * q + m into one fma either (aarch64 GCC would by default);
// clang only fuses within one expression, and mul_rn / add_rn keep the two apart. Under nvcc the
// host side of these functions is never called; the device side uses __fmul_rn / __fadd_rn.
#if !defined(__CUDACC__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#define PE_QUANT_BLOCKS_POP_OPTIONS
#endif

namespace pe::cuda {

constexpr int kChunk = 32;  // elements per chunk

// Weight types with a chunk decoder: those cpu::matmul_supports accepts (the float types and the
// ten quantized types of cpu::kQuantSchemes).
constexpr bool chunk_type_supported(GGMLType t) {
  switch (t) {
    case GGMLType::F32:
    case GGMLType::F16:
    case GGMLType::BF16:
    case GGMLType::Q4_0:
    case GGMLType::Q4_1:
    case GGMLType::Q5_0:
    case GGMLType::Q5_1:
    case GGMLType::Q8_0:
    case GGMLType::Q2_K:
    case GGMLType::Q3_K:
    case GGMLType::Q4_K:
    case GGMLType::Q5_K:
    case GGMLType::Q6_K:
      return true;
    default:
      return false;
  }
}

// The alignment, in bytes, that rows of type t (their start and their stride) need on the GPU.
constexpr int chunk_row_alignment(GGMLType t) { return t == GGMLType::F32 ? 4 : 2; }

// Calls f(std::integral_constant<GGMLType, T>{}) for the supported type t, so a host launcher can
// pick a kernel templated on the type. Returns false (and calls nothing) for other types.
template <typename F>
bool visit_chunk_type(GGMLType t, F&& f) {
  using T = GGMLType;
  switch (t) {
    case T::F32: f(std::integral_constant<T, T::F32>{}); return true;
    case T::F16: f(std::integral_constant<T, T::F16>{}); return true;
    case T::BF16: f(std::integral_constant<T, T::BF16>{}); return true;
    case T::Q4_0: f(std::integral_constant<T, T::Q4_0>{}); return true;
    case T::Q4_1: f(std::integral_constant<T, T::Q4_1>{}); return true;
    case T::Q5_0: f(std::integral_constant<T, T::Q5_0>{}); return true;
    case T::Q5_1: f(std::integral_constant<T, T::Q5_1>{}); return true;
    case T::Q8_0: f(std::integral_constant<T, T::Q8_0>{}); return true;
    case T::Q2_K: f(std::integral_constant<T, T::Q2_K>{}); return true;
    case T::Q3_K: f(std::integral_constant<T, T::Q3_K>{}); return true;
    case T::Q4_K: f(std::integral_constant<T, T::Q4_K>{}); return true;
    case T::Q5_K: f(std::integral_constant<T, T::Q5_K>{}); return true;
    case T::Q6_K: f(std::integral_constant<T, T::Q6_K>{}); return true;
    default: return false;
  }
}

// ---- scalar helpers -------------------------------------------------------------------------------

PE_HD uint32_t float_to_bits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

PE_HD float bits_to_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// a * b and a + b, each rounded to nearest: the compiler may not contract them into an fma.
PE_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
PE_HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// IEEE half (as bits) to float, exact for every input: zeros, subnormals, normals, inf, NaN (payload
// kept, as pe::fp16_to_fp32 does).
PE_HD float half_bits_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float (a power-of-two scaling of an integer < 2^10).
    return bits_to_float(float_to_bits(float(mant) * 5.9604644775390625e-8f) | sign);
  }
  if (exp == 31) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  return bits_to_float(sign | ((exp + (127 - 15)) << 23) | (mant << 13));
}

// bfloat16 (as bits) to float: the upper half of the float's bits, exact for every input.
PE_HD float bf16_bits_to_float(uint32_t h) { return bits_to_float((h & 0xffffu) << 16); }

// Little-endian 16-bit value at p, which must be 2-byte aligned.
PE_HD uint32_t load_u16(const uint8_t* p) {
#ifdef __CUDA_ARCH__
  return *reinterpret_cast<const uint16_t*>(p);
#else
  return uint32_t(p[0]) | (uint32_t(p[1]) << 8);
#endif
}

// Little-endian 32-bit value at p, which must be 2-byte aligned.
PE_HD uint32_t load_u32_a2(const uint8_t* p) { return load_u16(p) | (load_u16(p + 2) << 16); }

PE_HD float load_half(const uint8_t* p) { return half_bits_to_float(load_u16(p)); }

// N little-endian 32-bit words from the 4N bytes at p (2-byte aligned): the bytes of a chunk's
// quants in registers; byte i is byte_at(w, i).
template <int N>
PE_HD void load_words(const uint8_t* p, uint32_t (&w)[N]) {
  PE_UNROLL
  for (int i = 0; i < N; i++) w[i] = load_u32_a2(p + 4 * i);
}
template <int N>
PE_HD uint32_t byte_at(const uint32_t (&w)[N], int i) {
  return (w[i >> 2] >> (8 * (i & 3))) & 0xffu;
}

// A signed byte's value without an implementation-defined conversion.
PE_HD int sign_extend8(uint32_t b) { return int(b & 0x7fu) - int(b & 0x80u); }

// ---- per-type chunk decoders ------------------------------------------------------------------------
// Each decodes chunk `c` (elements 32c..32c+31) of a row starting at `row` into out[32]. The
// formulas are cpu::dequantize_row_ref's: scale * (u - offset) for symmetric types, scale * u + min
// (min already negated) for types with a minimum.

// Q4_0: 18-byte blocks {fp16 d; qs[16]}; element l < 16 is the low nibble of qs[l], l + 16 the high.
PE_HD void dequant_chunk_q4_0(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + c * 18;
  const float d = load_half(blk);
  uint32_t qs[4];
  load_words(blk + 2, qs);
  PE_UNROLL
  for (int l = 0; l < 16; l++) {
    const uint32_t b = byte_at(qs, l);
    out[l] = mul_rn(d, float(int(b & 0xfu) - 8));
    out[l + 16] = mul_rn(d, float(int(b >> 4) - 8));
  }
}

// Q4_1: 20-byte blocks {fp16 d; fp16 m; qs[16]}.
PE_HD void dequant_chunk_q4_1(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + c * 20;
  const float d = load_half(blk), m = load_half(blk + 2);
  uint32_t qs[4];
  load_words(blk + 4, qs);
  PE_UNROLL
  for (int l = 0; l < 16; l++) {
    const uint32_t b = byte_at(qs, l);
    out[l] = add_rn(mul_rn(d, float(b & 0xfu)), m);
    out[l + 16] = add_rn(mul_rn(d, float(b >> 4)), m);
  }
}

// Q5_0 / Q5_1: {fp16 d; [fp16 m;] uint32 qh; qs[16]}; bit l of qh is the fifth bit of element l.
template <bool kHasMin>
PE_HD void dequant_chunk_q5(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + c * (kHasMin ? 24 : 22);
  const float d = load_half(blk);
  const float m = kHasMin ? load_half(blk + 2) : 0.0f;
  const uint8_t* qh_p = blk + (kHasMin ? 4 : 2);
  const uint32_t qh = load_u32_a2(qh_p);
  uint32_t qs[4];
  load_words(qh_p + 4, qs);
  PE_UNROLL
  for (int l = 0; l < 16; l++) {
    const uint32_t b = byte_at(qs, l);
    const uint32_t lo = (b & 0xfu) | (((qh >> l) & 1u) << 4);
    const uint32_t hi = (b >> 4) | (((qh >> (l + 16)) & 1u) << 4);
    if (kHasMin) {
      out[l] = add_rn(mul_rn(d, float(lo)), m);
      out[l + 16] = add_rn(mul_rn(d, float(hi)), m);
    } else {
      out[l] = mul_rn(d, float(int(lo) - 16));
      out[l + 16] = mul_rn(d, float(int(hi) - 16));
    }
  }
}

// Q8_0: 34-byte blocks {fp16 d; int8 qs[32]}.
PE_HD void dequant_chunk_q8_0(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + c * 34;
  const float d = load_half(blk);
  uint32_t qs[8];
  load_words(blk + 2, qs);
  PE_UNROLL
  for (int l = 0; l < 32; l++) out[l] = mul_rn(d, float(sign_extend8(byte_at(qs, l))));
}

// The K-quants: 256-element super-blocks, 8 chunks each. Chunk ci of a super-block is elements
// 32ci..32ci+31; in Q2_K / Q3_K / Q6_K those are 128n + 32j + l with n = ci / 4, j = ci % 4.

// Q2_K: 84 bytes {scales[16]; qs[64]; fp16 d; fp16 dmin}. Element 128n + 32j + l is bits 2j..2j+1
// of qs[32n + l]; sub-block s (16 elements) has scale d * (scales[s] & 15) and min
// -dmin * (scales[s] >> 4).
PE_HD void dequant_chunk_q2_K(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + (c >> 3) * 84;
  const int ci = int(c & 7), n = ci >> 2, j = ci & 3;
  const float d = load_half(blk + 80), dmin = load_half(blk + 82);
  uint32_t qs[8];
  load_words(blk + 16 + 32 * n, qs);
  PE_UNROLL
  for (int h = 0; h < 2; h++) {
    const uint32_t sc = blk[2 * ci + h];
    const float scale = mul_rn(d, float(sc & 0xfu));
    const float min = -mul_rn(dmin, float(sc >> 4));
    PE_UNROLL
    for (int l = 16 * h; l < 16 * h + 16; l++) {
      const uint32_t u = (byte_at(qs, l) >> (2 * j)) & 3u;
      out[l] = add_rn(mul_rn(scale, float(u)), min);
    }
  }
}

// Q3_K: 110 bytes {hmask[32]; qs[64]; scales[12]; fp16 d}. Element 128n + 32j + l is bits 2j..2j+1
// of qs[32n + l] plus 4 when bit 4n + j of hmask[l] is set, minus 4; sub-block s has a 6-bit scale
// (low 4 bits in scales[s % 8] nibble s / 8, high 2 bits in scales[8 + s % 4] bits 2(s/4)), minus 32.
// Sub-block s's signed 6-bit scale from the 12 scale bytes (shared with quant_dot.cuh's decoder).
PE_HD int q3_K_scale(const uint8_t* scales, int s) {
  const uint32_t lo = s < 8 ? scales[s] & 0xfu : uint32_t(scales[s - 8]) >> 4;
  const uint32_t hi = (uint32_t(scales[8 + (s & 3)]) >> (2 * (s >> 2))) & 3u;
  return int(lo | (hi << 4)) - 32;
}

PE_HD void dequant_chunk_q3_K(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + (c >> 3) * 110;
  const int ci = int(c & 7), n = ci >> 2, j = ci & 3;
  const float d = load_half(blk + 108);
  const uint8_t* scales = blk + 96;
  uint32_t hmask[8], qs[8];
  load_words(blk, hmask);
  load_words(blk + 32 + 32 * n, qs);
  PE_UNROLL
  for (int h = 0; h < 2; h++) {
    const float scale = mul_rn(d, float(q3_K_scale(scales, 2 * ci + h)));
    PE_UNROLL
    for (int l = 16 * h; l < 16 * h + 16; l++) {
      const uint32_t u = ((byte_at(qs, l) >> (2 * j)) & 3u) | (((byte_at(hmask, l) >> (4 * n + j)) & 1u) << 2);
      out[l] = mul_rn(scale, float(int(u) - 4));
    }
  }
}

// Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4).
PE_HD void k4_scale_min(const uint8_t* q, int j, uint32_t& sc, uint32_t& m) {
  if (j < 4) {
    sc = q[j] & 63u;
    m = q[j + 4] & 63u;
  } else {
    sc = (q[j + 4] & 0xfu) | ((uint32_t(q[j - 4]) >> 6) << 4);
    m = (uint32_t(q[j + 4]) >> 4) | ((uint32_t(q[j]) >> 6) << 4);
  }
}

// Q4_K: 144 bytes {fp16 d; fp16 dmin; scales[12]; qs[128]}; Q5_K: 176 bytes {fp16 d; fp16 dmin;
// scales[12]; qh[32]; qs[128]}. Chunk ci is sub-block ci: the low nibbles of qs[32(ci/2) + l] for
// even ci, the high ones for odd ci; Q5_K's fifth bit of element l is bit ci of qh[l].
template <bool kQ5>
PE_HD void dequant_chunk_q45_K(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + (c >> 3) * (kQ5 ? 176 : 144);
  const int ci = int(c & 7);
  const float d = load_half(blk), dmin = load_half(blk + 2);
  uint32_t sc, mn;
  k4_scale_min(blk + 4, ci, sc, mn);
  const float scale = mul_rn(d, float(sc));
  const float min = -mul_rn(dmin, float(mn));
  uint32_t qs[8];
  load_words(blk + (kQ5 ? 48 : 16) + 32 * (ci >> 1), qs);
  const int shift = 4 * (ci & 1);
  if (kQ5) {
    uint32_t qh[8];
    load_words(blk + 16, qh);
    PE_UNROLL
    for (int l = 0; l < 32; l++) {
      const uint32_t u = ((byte_at(qs, l) >> shift) & 0xfu) | (((byte_at(qh, l) >> ci) & 1u) << 4);
      out[l] = add_rn(mul_rn(scale, float(u)), min);
    }
  } else {
    PE_UNROLL
    for (int l = 0; l < 32; l++) {
      const uint32_t u = (byte_at(qs, l) >> shift) & 0xfu;
      out[l] = add_rn(mul_rn(scale, float(u)), min);
    }
  }
}

// Q6_K: 210 bytes {ql[128]; qh[64]; int8 scales[16]; fp16 d}. Element 128n + 32k + l (k = ci % 4)
// is nibble k / 2 of ql[64n + 32(k % 2) + l] with bits 2k..2k+1 of qh[32n + l] above it, minus 32;
// sub-block s has scale d * scales[s].
PE_HD void dequant_chunk_q6_K(const uint8_t* row, int64_t c, float (&out)[32]) {
  const uint8_t* blk = row + (c >> 3) * 210;
  const int ci = int(c & 7), n = ci >> 2, k = ci & 3;
  const float d = load_half(blk + 208);
  uint32_t ql[8], qh[8];
  load_words(blk + 64 * n + 32 * (k & 1), ql);
  load_words(blk + 128 + 32 * n, qh);
  const int shift = 4 * (k >> 1);
  PE_UNROLL
  for (int h = 0; h < 2; h++) {
    const float scale = mul_rn(d, float(sign_extend8(blk[192 + 2 * ci + h])));
    PE_UNROLL
    for (int l = 16 * h; l < 16 * h + 16; l++) {
      const uint32_t u = ((byte_at(ql, l) >> shift) & 0xfu) | (((byte_at(qh, l) >> (2 * k)) & 3u) << 4);
      out[l] = mul_rn(scale, float(int(u) - 32));
    }
  }
}

// Float types: chunk c is elements 32c.. of the row; only the first n (<= 32) are read, the rest
// of out is zero (a row of a float type need not be a whole number of chunks).
template <GGMLType T>
PE_HD void dequant_chunk_float(const uint8_t* row, int64_t c, int n, float (&out)[32]) {
  PE_UNROLL
  for (int l = 0; l < 32; l++) {
    float v = 0.0f;
    if (l < n) {
      const int64_t i = c * 32 + l;
      if constexpr (T == GGMLType::F16) {
        v = load_half(row + 2 * i);
      } else if constexpr (T == GGMLType::BF16) {
        v = bf16_bits_to_float(load_u16(row + 2 * i));
      } else {
#ifdef __CUDA_ARCH__
        v = reinterpret_cast<const float*>(row)[i];
#else
        memcpy(&v, row + 4 * i, 4);
#endif
      }
    }
    out[l] = v;
  }
}

// ---- dispatch ---------------------------------------------------------------------------------------

// Chunk c of a row of `cols` elements of type T, zero past the end of the row. For the quantized
// types cols is a multiple of the block size, so a chunk is either whole or entirely past the end.
template <GGMLType T>
PE_HD void dequantize_chunk(const uint8_t* row, int64_t cols, int64_t c, float (&out)[32]) {
  const int64_t left = cols - c * kChunk;
  if (left <= 0) {
    PE_UNROLL
    for (int l = 0; l < 32; l++) out[l] = 0.0f;
    return;
  }
  if constexpr (T == GGMLType::F32 || T == GGMLType::F16 || T == GGMLType::BF16) {
    dequant_chunk_float<T>(row, c, left < kChunk ? int(left) : kChunk, out);
  } else if constexpr (T == GGMLType::Q4_0) {
    dequant_chunk_q4_0(row, c, out);
  } else if constexpr (T == GGMLType::Q4_1) {
    dequant_chunk_q4_1(row, c, out);
  } else if constexpr (T == GGMLType::Q5_0) {
    dequant_chunk_q5<false>(row, c, out);
  } else if constexpr (T == GGMLType::Q5_1) {
    dequant_chunk_q5<true>(row, c, out);
  } else if constexpr (T == GGMLType::Q8_0) {
    dequant_chunk_q8_0(row, c, out);
  } else if constexpr (T == GGMLType::Q2_K) {
    dequant_chunk_q2_K(row, c, out);
  } else if constexpr (T == GGMLType::Q3_K) {
    dequant_chunk_q3_K(row, c, out);
  } else if constexpr (T == GGMLType::Q4_K) {
    dequant_chunk_q45_K<false>(row, c, out);
  } else if constexpr (T == GGMLType::Q5_K) {
    dequant_chunk_q45_K<true>(row, c, out);
  } else {
    static_assert(T == GGMLType::Q6_K, "dequantize_chunk: type without a chunk decoder");
    dequant_chunk_q6_K(row, c, out);
  }
}

// The same, for a type known at run time (host code and tests). Returns false, leaving out
// untouched, for a type without a decoder.
PE_HD bool dequantize_chunk(GGMLType t, const uint8_t* row, int64_t cols, int64_t c, float (&out)[32]) {
  switch (t) {
    case GGMLType::F32: dequantize_chunk<GGMLType::F32>(row, cols, c, out); return true;
    case GGMLType::F16: dequantize_chunk<GGMLType::F16>(row, cols, c, out); return true;
    case GGMLType::BF16: dequantize_chunk<GGMLType::BF16>(row, cols, c, out); return true;
    case GGMLType::Q4_0: dequantize_chunk<GGMLType::Q4_0>(row, cols, c, out); return true;
    case GGMLType::Q4_1: dequantize_chunk<GGMLType::Q4_1>(row, cols, c, out); return true;
    case GGMLType::Q5_0: dequantize_chunk<GGMLType::Q5_0>(row, cols, c, out); return true;
    case GGMLType::Q5_1: dequantize_chunk<GGMLType::Q5_1>(row, cols, c, out); return true;
    case GGMLType::Q8_0: dequantize_chunk<GGMLType::Q8_0>(row, cols, c, out); return true;
    case GGMLType::Q2_K: dequantize_chunk<GGMLType::Q2_K>(row, cols, c, out); return true;
    case GGMLType::Q3_K: dequantize_chunk<GGMLType::Q3_K>(row, cols, c, out); return true;
    case GGMLType::Q4_K: dequantize_chunk<GGMLType::Q4_K>(row, cols, c, out); return true;
    case GGMLType::Q5_K: dequantize_chunk<GGMLType::Q5_K>(row, cols, c, out); return true;
    case GGMLType::Q6_K: dequantize_chunk<GGMLType::Q6_K>(row, cols, c, out); return true;
    default: return false;
  }
}

// Chunk `chunk` of a row whose every chunk is whole (elements 32*chunk..32*chunk+31 all exist).
PE_HD bool dequantize_chunk32(GGMLType t, const uint8_t* row, int64_t chunk, float (&out)[32]) {
  return dequantize_chunk(t, row, (chunk + 1) * kChunk, chunk, out);
}

}  // namespace pe::cuda

#ifdef PE_QUANT_BLOCKS_POP_OPTIONS
#pragma GCC pop_options
#undef PE_QUANT_BLOCKS_POP_OPTIONS
#endif
