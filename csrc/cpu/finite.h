// Non-finite detection for float rows: a NaN or +-Inf has an exponent of all ones. Integer tests,
// so the answer is exact whatever the ISA or the float flags, and the loop vectorizes under each
// file's ISA flags (static: every including file keeps its own copy).
#pragma once
#include <cstdint>
#include <cstring>

namespace pe::cpu {

static inline bool all_finite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; i++) {
    uint32_t b;
    std::memcpy(&b, x + i, sizeof b);
    bad |= uint32_t((b & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

}  // namespace pe::cpu
