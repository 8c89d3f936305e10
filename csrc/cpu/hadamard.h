// The orthonormal Walsh-Hadamard rotation llama.cpp applies to keys, queries and values around a
// quantized KV cache (its "attention rotation", llama-kv-cache.cpp): H = Sylvester's Hadamard matrix /
// sqrt(n), symmetric with H H = I, so (H q) . (H k) = q . k, and sum_j p_j H v_j = H sum_j p_j v_j.
// Rotating spreads a few large dimensions (Qwen2's keys have some) over the whole block, so the
// int8 blocks of 32 lose far less to their largest value.
#pragma once
#include <cmath>
#include <cstdint>

namespace pe::cpu {

// x[0..n) = H x[0..n) applied to each of its blocks of `block` elements (a power of two; 0: none), by
// the fast transform's butterflies (n log n adds), then the 1/sqrt(block) scale.
inline void hadamard_rotate(float* x, int64_t n, int block) {
  if (block <= 1) return;
  const float scale = 1.f / std::sqrt(float(block));
  for (int64_t b = 0; b < n; b += block) {
    float* y = x + b;
    for (int h = 1; h < block; h *= 2)
      for (int i = 0; i < block; i += 2 * h)
        for (int j = i; j < i + h; j++) {
          const float a = y[j], c = y[j + h];
          y[j] = a + c;
          y[j + h] = a - c;
        }
    for (int i = 0; i < block; i++) y[i] *= scale;
  }
}

}  // namespace pe::cpu
