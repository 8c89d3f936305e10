// The inner products of attention over one KV cache page, per ISA (attention_simd.h holds them once,
// attention_<isa>.cpp instantiates them; the portable copy is in attention.cpp).
//
// A page keeps K transposed, K^T [head_dim][kPageSize], and V as it is, [kPageSize][head_dim], so both
// products stream along rows with the vector lanes on keys (scores) or on head dims (values): plain
// FMAs, no horizontal sums. Each key's score and each output's sum run in one fixed order whatever
// the number of query rows, so a row decoded alone gets the same bits as inside a prefill block.
#pragma once
#include <cstdint>

#include "ggml_types.h"

namespace pe::cpu {

// A cache's element type. Q8: int8 values x an fp16 scale per kQ8Dims dimensions of a position (kv_layout.h).
enum class KVElem { F32, F16, Q8 };
constexpr int kQ8Dims = 32;

struct AttentionKernels {
  // s[t][j] = sum_d q[t][d] * kt[d][j] for t < nb, j < n; kt rows `ldk` elements apart. Q8: kt[d][j] is
  // times ks[(d / 32) * ldk + j].
  void (*scores)(const void* kt, const fp16_t* ks, KVElem e, int64_t ldk, int hd, int n, const float* q, int64_t ldq,
                 int nb, float* s, int64_t lds);
  // o[t][d] += sum_j p[t][j] * v[j][d] for t < nb, d < hd; v rows hd elements apart. Q8: v[j][d] is times
  // vs[j * (hd / 32) + d / 32].
  void (*values)(const void* v, const fp16_t* vs, KVElem e, int hd, int n, const float* p, int64_t ldp, int nb,
                 float* o, int64_t ldo);
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
