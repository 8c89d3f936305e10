// The inner products of attention over one KV cache page, per ISA (attention_simd.h holds them once,
// attention_<isa>.cpp instantiates them; the portable copy is in attention.cpp).
//
// A page keeps K transposed, K^T [head_dim][kPageSize], and V as it is, [kPageSize][head_dim], so both
// products stream along rows with the vector lanes on keys (scores) or on head dims (values): plain
// FMAs, no horizontal sums. Each key's score and each output's sum run in one fixed order whatever
// the number of query rows, so a row decoded alone gets the same bits as inside a prefill block.
#pragma once
#include <cstdint>

namespace pe::cpu {

struct AttentionKernels {
  // s[t][j] = sum_d q[t][d] * kt[d][j] for t < nb, j < n; kt rows `ldk` elements apart, F16 or F32.
  void (*scores)(const void* kt, bool f16, int64_t ldk, int hd, int n, const float* q, int64_t ldq, int nb, float* s,
                 int64_t lds);
  // o[t][d] += sum_j p[t][j] * v[j][d] for t < nb, d < hd; v rows hd elements apart, F16 or F32.
  void (*values)(const void* v, bool f16, int hd, int n, const float* p, int64_t ldp, int nb, float* o, int64_t ldo);
  // s[0..n) = softmax(scale * s[0..n)) in place (n >= 1, finite inputs).
  void (*softmax)(float* s, int64_t n, float scale);
};

extern const AttentionKernels kPortableAttention;
#if defined(PE_X86)
extern const AttentionKernels kAvx2Attention;
extern const AttentionKernels kAvx512Attention;
#endif

// The current CPU path's softmax kernel (for tests).
void attention_softmax(float* s, int64_t n, float scale);

constexpr int kMaxQueryBlock = 8;  // query rows per call: their accumulators stay in registers

}  // namespace pe::cpu
