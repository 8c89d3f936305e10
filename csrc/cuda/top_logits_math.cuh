// The arithmetic of cuda/top_logits.cu, shared with its host mirror (bindings_cuda_quant.cpp's
// cuda_host_top_logits) so that a machine without a GPU tests the same radix selection
// (tests/test_cuda_host_top_logits.py). Compiled by nvcc and by the host compiler.
//
// Selection by radix: a float's order key is an unsigned integer that sorts as the float does; the
// k-th largest key is found a byte at a time from the top, each round counting the digits of the
// keys that still match the bytes chosen so far (256 bins) and keeping the bin that holds the k-th.
// As soon as the keys at or above the chosen prefix are few enough to sort in shared memory, they
// are gathered and sorted, so most rows take one or two rounds.
#pragma once
#include <stdint.h>
#include <string.h>

#include "cuda/host_device.h"

namespace pe::cuda {

// Candidates a block sorts in shared memory (8 bytes each).
constexpr int kTopCandidates = 2048;

// Sorts as the float: negative floats have their bits flipped, positive ones the sign bit set. -0.0
// is taken as +0.0, so equal values tie (and ties go to the lower index, as a stable sort has them).
PE_HD uint32_t order_key(float x) {
  uint32_t u;
  if (x == 0.0f) x = 0.0f;
  memcpy(&u, &x, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

PE_HD float order_key_value(uint32_t key) {
  const uint32_t u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float x;
  memcpy(&x, &u, 4);
  return x;
}

// A candidate as one integer: larger key first, then lower index (a descending sort of these is
// the stable descending sort of the values). 0 is below every candidate: no float's key is 0.
PE_HD uint64_t top_candidate(uint32_t key, uint32_t index) {
  return (uint64_t(key) << 32) | uint64_t(0xffffffffu - index);
}
PE_HD uint32_t top_candidate_key(uint64_t c) { return uint32_t(c >> 32); }
PE_HD uint32_t top_candidate_index(uint64_t c) { return 0xffffffffu - uint32_t(c); }

// The selection after some rounds: keys with (key & mask) == prefix hold the k-th largest, which
// is the k-th largest among them; `above` keys are greater than all of them.
struct RadixState {
  uint32_t prefix, mask, k, above, bin_count;
};

PE_HD RadixState radix_start(uint32_t k) { return RadixState{0u, 0u, k, 0u, 0u}; }
PE_HD bool radix_matches(uint32_t key, const RadixState& s) { return (key & s.mask) == s.prefix; }
PE_HD int radix_digit(uint32_t key, int shift) { return int((key >> shift) & 255u); }

// After counting the digits at `shift` of the matching keys into hist: keeps the bin holding the
// k-th largest (the top bin with at least k keys at or above it).
PE_HD void radix_pick(const uint32_t* hist, int shift, RadixState& s) {
  uint32_t above = 0;
  int b = 255;
  for (; b > 0; b--) {
    if (above + hist[b] >= s.k) break;
    above += hist[b];
  }
  s.prefix |= uint32_t(b) << shift;
  s.mask |= 255u << shift;
  s.k -= above;
  s.above += above;
  s.bin_count = hist[b];
}

// Keys at or above the prefix: every key that can be among the k largest. Their number is
// s.above + s.bin_count; once the mask is whole, s.prefix is the k-th largest key itself.
PE_HD bool radix_candidate(uint32_t key, const RadixState& s) { return key >= s.prefix; }

}  // namespace pe::cuda
