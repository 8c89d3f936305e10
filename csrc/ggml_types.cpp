#include "ggml_types.h"

#include <cmath>
#include <vector>

namespace pe {

namespace {
struct TypeEntry {
  uint32_t id;
  TypeTraits traits;
};
const TypeEntry kTypes[] = {
    {0, {"F32", 1, 4}},
    {1, {"F16", 1, 2}},
    {2, {"Q4_0", QK4_0, sizeof(block_q4_0)}},
    {3, {"Q4_1", QK4_1, sizeof(block_q4_1)}},
    {6, {"Q5_0", QK5_0, sizeof(block_q5_0)}},
    {7, {"Q5_1", QK5_1, sizeof(block_q5_1)}},
    {8, {"Q8_0", QK8_0, sizeof(block_q8_0)}},
    {9, {"Q8_1", QK8_1, sizeof(block_q8_1)}},
    {10, {"Q2_K", QK_K, sizeof(block_q2_K)}},
    {11, {"Q3_K", QK_K, sizeof(block_q3_K)}},
    {12, {"Q4_K", QK_K, sizeof(block_q4_K)}},
    {13, {"Q5_K", QK_K, sizeof(block_q5_K)}},
    {14, {"Q6_K", QK_K, sizeof(block_q6_K)}},
    {15, {"Q8_K", QK_K, sizeof(block_q8_K)}},
    {26, {"I32", 1, 4}},
    {30, {"BF16", 1, 2}},
};

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        exp--;
      }
      mant &= 0x3ff;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000 | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

const std::vector<float>& fp16_table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t i = 0; i < 65536; i++) t[i] = half_bits_to_float(uint16_t(i));
    return t;
  }();
  return table;
}
}  // namespace

const TypeTraits* type_traits(uint32_t id) {
  for (const auto& e : kTypes)
    if (e.id == id) return &e.traits;
  return nullptr;
}

const char* type_name(uint32_t id) {
  const TypeTraits* t = type_traits(id);
  return t ? t->name : "unknown";
}

size_t row_bytes(GGMLType t, int64_t n) {
  const TypeTraits* tr = type_traits(uint32_t(t));
  PE_CHECK(tr, UnsupportedModelError, "unknown tensor type id ", uint32_t(t));
  PE_CHECK(n % tr->block_size == 0, ModelFormatError, "row of ", n, " elements is not a multiple of the ",
           tr->name, " block size ", tr->block_size);
  return size_t(n / tr->block_size) * tr->type_size;
}

float fp16_to_fp32(fp16_t h) { return fp16_table()[h]; }

fp16_t fp32_to_fp16(float f) {
  // Round to nearest even (same as F16C's _cvtss_sh with rounding mode 0).
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  uint32_t absx = x & 0x7fffffff;
  if (absx >= 0x7f800000) return fp16_t(sign | 0x7c00 | (absx > 0x7f800000 ? 0x200 : 0));
  if (absx >= 0x477ff000) return fp16_t(sign | 0x7c00);  // overflow to inf
  if (absx < 0x38800000) {                               // subnormal or zero in half
    float a;
    std::memcpy(&a, &absx, 4);
    // 2^-24 is the smallest half subnormal; adding 0.5 rounds to even through the FPU.
    const float scaled = a * 16777216.0f;  // a / 2^-24
    uint32_t m = uint32_t(std::nearbyint(scaled));
    return fp16_t(sign | m);
  }
  uint32_t mant = absx & 0x7fffff;
  uint32_t exp = (absx >> 23) - 127 + 15;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
  return fp16_t(sign | h);
}

}  // namespace pe
