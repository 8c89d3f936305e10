#include "cpu/quant_blocks.h"

#include <cstring>

// Dequantization must round exactly as ggml does (one multiply, one add), so no fused multiply-add.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace pe::cpu {

namespace {

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Q4_K / Q5_K: eight 6-bit scales and mins packed in 12 bytes (ggml's get_scale_min_k4).
void k4_scale_min(const uint8_t* q, int j, uint8_t& sc, uint8_t& m) {
  if (j < 4) {
    sc = q[j] & 63;
    m = q[j + 4] & 63;
  } else {
    sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

}  // namespace

void unpack_block(const QuantScheme& s, const uint8_t* blk, uint8_t* u, float* scale, float* min) {
  switch (s.type) {
    case GGMLType::Q4_0: {
      const auto* b = reinterpret_cast<const block_q4_0*>(blk);
      scale[0] = fp16_to_fp32(b->d);
      for (int j = 0; j < 16; j++) {
        u[j] = b->qs[j] & 0xF;
        u[j + 16] = b->qs[j] >> 4;
      }
      break;
    }
    case GGMLType::Q4_1: {
      const auto* b = reinterpret_cast<const block_q4_1*>(blk);
      scale[0] = fp16_to_fp32(b->d);
      min[0] = fp16_to_fp32(b->m);
      for (int j = 0; j < 16; j++) {
        u[j] = b->qs[j] & 0xF;
        u[j + 16] = b->qs[j] >> 4;
      }
      break;
    }
    case GGMLType::Q5_0:
    case GGMLType::Q5_1: {
      const bool q51 = s.type == GGMLType::Q5_1;
      const uint8_t* qh_p = blk + (q51 ? 4 : 2);
      const uint8_t* qs = qh_p + 4;
      const uint32_t qh = load_u32(qh_p);
      uint16_t d, m;
      std::memcpy(&d, blk, 2);
      scale[0] = fp16_to_fp32(d);
      if (q51) {
        std::memcpy(&m, blk + 2, 2);
        min[0] = fp16_to_fp32(m);
      }
      for (int j = 0; j < 16; j++) {
        u[j] = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
        u[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      }
      break;
    }
    case GGMLType::Q8_0: {
      const auto* b = reinterpret_cast<const block_q8_0*>(blk);
      scale[0] = fp16_to_fp32(b->d);
      for (int j = 0; j < 32; j++) u[j] = uint8_t(b->qs[j]) ^ 0x80;
      break;
    }
    case GGMLType::Q2_K: {
      const auto* b = reinterpret_cast<const block_q2_K*>(blk);
      const float d = fp16_to_fp32(b->d), dmin = fp16_to_fp32(b->dmin);
      for (int j = 0; j < 16; j++) {
        scale[j] = d * float(b->scales[j] & 0xF);
        min[j] = -(dmin * float(b->scales[j] >> 4));
      }
      // Element 128n + 32j + l is bits 2j..2j+1 of qs[32n + l].
      for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++)
          for (int l = 0; l < 32; l++) u[128 * n + 32 * j + l] = (b->qs[32 * n + l] >> (2 * j)) & 3;
      break;
    }
    case GGMLType::Q3_K: {
      const auto* b = reinterpret_cast<const block_q3_K*>(blk);
      const float d = fp16_to_fp32(b->d);
      for (int j = 0; j < 16; j++) {
        const int lo = j < 8 ? b->scales[j] & 0xF : b->scales[j - 8] >> 4;
        const int hi = (b->scales[8 + j % 4] >> (2 * (j / 4))) & 3;
        scale[j] = d * float((lo | (hi << 4)) - 32);
      }
      // Element 128n + 32j + l: bits 2j..2j+1 of qs[32n + l], plus 4 when bit 4n+j of hmask[l] is set
      // (ggml subtracts 4 when it is clear; here u = q + 4 and the offset is 4).
      for (int n = 0; n < 2; n++)
        for (int j = 0; j < 4; j++)
          for (int l = 0; l < 32; l++)
            u[128 * n + 32 * j + l] =
                ((b->qs[32 * n + l] >> (2 * j)) & 3) | (((b->hmask[l] >> (4 * n + j)) & 1) << 2);
      break;
    }
    case GGMLType::Q4_K:
    case GGMLType::Q5_K: {
      const bool q5 = s.type == GGMLType::Q5_K;
      uint16_t dh, mh;
      std::memcpy(&dh, blk, 2);
      std::memcpy(&mh, blk + 2, 2);
      const float d = fp16_to_fp32(dh), dmin = fp16_to_fp32(mh);
      const uint8_t* sc_p = blk + 4;
      const uint8_t* qh = blk + 16;
      const uint8_t* qs = q5 ? blk + 48 : blk + 16;
      for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        k4_scale_min(sc_p, j, sc, m);
        scale[j] = d * float(sc);
        min[j] = -(dmin * float(m));
      }
      // Sub-block 2c is the low nibbles of qs[32c..32c+32), sub-block 2c+1 the high ones;
      // Q5_K's fifth bit of element 32j + l is bit j of qh[l].
      for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++) {
          u[64 * c + l] = qs[32 * c + l] & 0xF;
          u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
        }
      if (q5)
        for (int j = 0; j < 8; j++)
          for (int l = 0; l < 32; l++) u[32 * j + l] |= ((qh[l] >> j) & 1) << 4;
      break;
    }
    case GGMLType::Q6_K: {
      const auto* b = reinterpret_cast<const block_q6_K*>(blk);
      const float d = fp16_to_fp32(b->d);
      for (int j = 0; j < 16; j++) scale[j] = d * float(b->scales[j]);
      // Element 128n + 64s + t: nibble s of ql[64n + t], high bits 2k..2k+1 of qh[32n + t % 32] with
      // k = 2s + t / 32.
      for (int n = 0; n < 2; n++)
        for (int sh = 0; sh < 2; sh++)
          for (int t = 0; t < 64; t++) {
            const int k = 2 * sh + t / 32;
            u[128 * n + 64 * sh + t] =
                ((b->ql[64 * n + t] >> (4 * sh)) & 0xF) | (((b->qh[32 * n + t % 32] >> (2 * k)) & 3) << 4);
          }
      break;
    }
    default:
      PE_THROW(Error, "unpack_block: unsupported type ", type_name(uint32_t(s.type)));
  }
}

void dequantize_row_ref(GGMLType t, const void* row, int64_t n, float* out) {
  switch (t) {
    case GGMLType::F32:
      std::memcpy(out, row, size_t(n) * 4);
      return;
    case GGMLType::F16: {
      const auto* h = static_cast<const fp16_t*>(row);
      for (int64_t i = 0; i < n; i++) out[i] = fp16_to_fp32(h[i]);
      return;
    }
    case GGMLType::BF16: {
      const auto* h = static_cast<const bf16_t*>(row);
      for (int64_t i = 0; i < n; i++) out[i] = bf16_to_fp32(h[i]);
      return;
    }
    default:
      break;
  }
  const QuantScheme* s = quant_scheme(t);
  PE_CHECK(s, UnsupportedModelError, "dequantize: unsupported type ", type_name(uint32_t(t)));
  const auto* p = static_cast<const uint8_t*>(row);
  uint8_t u[QK_K];
  float scale[QK_K / 16], min[QK_K / 16];
  for (int64_t b = 0; b < n / s->block; b++, p += s->block_bytes, out += s->block) {
    unpack_block(*s, p, u, scale, min);
    // Same arithmetic as gguf-py: scale * (q - offset) for symmetric types, scale * q + min otherwise.
    for (int k = 0; k < s->block; k++) {
      const int j = k / s->sub;
      out[k] = s->has_min ? scale[j] * float(u[k]) + min[j] : scale[j] * float(int(u[k]) - s->offset);
    }
  }
}

}  // namespace pe::cpu
