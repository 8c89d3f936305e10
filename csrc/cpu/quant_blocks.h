// Scalar decoding of ggml's quantized blocks: exact dequantization (bit-identical to ggml and
// gguf-py) and the "integer form" that every matmul kernel consumes.
#pragma once
#include <cstdint>

#include "ggml_types.h"

namespace pe::cpu {

// Integer form of a quantized type. A block splits into sub-blocks of `sub` elements; element k of
// sub-block j is
//     w = scale[j] * (u[k] - offset) + min[j]
// with u an unsigned byte <= max_u. One form for all ten types lets each ISA have a single dot-product
// kernel (u8 x s8 -> s32, i.e. vpdpbusd / pmaddubsw): a type only changes how its bytes unpack to
// u, scale and min. Offsets are folded into the activation side as -offset * sum(x) per sub-block.
struct QuantScheme {
  GGMLType type;
  int block;     // elements per ggml block
  int sub;       // elements per sub-block: 16 or 32
  int offset;    // 8 for Q4_0, 16 for Q5_0, 128 for Q8_0, 4 for Q3_K, 32 for Q6_K, else 0
  int max_u;     // largest u: bounds int16 partial sums on AVX2
  bool has_min;  // Q4_1, Q5_1, Q2_K, Q4_K, Q5_K
  int block_bytes;
  // Byte offsets in the block of its fp16 fields (scales, mins; -1: none). Every other byte belongs to
  // 4-byte words of packed values or scales: the panel layout (cpu/panels.h) interleaves the two kinds
  // of field in their own units.
  int f16_at[2];
};

// Every quantized type the matmul kernels handle. A constant expression, so that the SIMD kernels'
// unpackers (unpack_simd.h) take their block geometry from here at compile time.
inline constexpr QuantScheme kQuantSchemes[] = {
    // type            block sub  off max_u min    bytes                fp16 fields
    {GGMLType::Q4_0, QK4_0, 32, 8, 15, false, sizeof(block_q4_0), {0, -1}},
    {GGMLType::Q4_1, QK4_1, 32, 0, 15, true, sizeof(block_q4_1), {0, 2}},
    {GGMLType::Q5_0, QK5_0, 32, 16, 31, false, sizeof(block_q5_0), {0, -1}},
    {GGMLType::Q5_1, QK5_1, 32, 0, 31, true, sizeof(block_q5_1), {0, 2}},
    {GGMLType::Q8_0, QK8_0, 32, 128, 255, false, sizeof(block_q8_0), {0, -1}},
    {GGMLType::Q2_K, QK_K, 16, 0, 3, true, sizeof(block_q2_K), {80, 82}},
    {GGMLType::Q3_K, QK_K, 16, 4, 7, false, sizeof(block_q3_K), {108, -1}},
    {GGMLType::Q4_K, QK_K, 32, 0, 15, true, sizeof(block_q4_K), {0, 2}},
    {GGMLType::Q5_K, QK_K, 32, 0, 31, true, sizeof(block_q5_K), {0, 2}},
    {GGMLType::Q6_K, QK_K, 16, 32, 63, false, sizeof(block_q6_K), {208, -1}},
};

// nullptr for float types (F32, F16, BF16) and types the kernels do not handle.
constexpr const QuantScheme* quant_scheme(GGMLType t) {
  for (const auto& s : kQuantSchemes)
    if (s.type == t) return &s;
  return nullptr;
}

// The float weight types, which the matmul kernels read unquantized.
constexpr bool is_float_type(GGMLType t) { return t == GGMLType::F32 || t == GGMLType::F16 || t == GGMLType::BF16; }

// Unpacks one ggml block (raw bytes) to u[block], scale[block/sub] and, if has_min, min[block/sub].
void unpack_block(const QuantScheme& s, const uint8_t* blk, uint8_t* u, float* scale, float* min);

// Exact dequantization of n elements of a row (n a multiple of the block size), as gguf-py computes it.
void dequantize_row_ref(GGMLType t, const void* row, int64_t n, float* out);

}  // namespace pe::cpu
