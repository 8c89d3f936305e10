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
};

// nullptr for float types (F32, F16, BF16) and types the kernels do not handle.
const QuantScheme* quant_scheme(GGMLType t);

// Unpacks one ggml block (raw bytes) to u[block], scale[block/sub] and, if has_min, min[block/sub].
void unpack_block(const QuantScheme& s, const uint8_t* blk, uint8_t* u, float* scale, float* min);

// Exact dequantization of n elements of a row (n a multiple of the block size), as gguf-py computes it.
void dequantize_row_ref(GGMLType t, const void* row, int64_t n, float* out);

}  // namespace pe::cpu
