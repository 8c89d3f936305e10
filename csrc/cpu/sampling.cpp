#include "cpu/sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "cpu/ops.h"
#include "cpu/vec_clones.h"

namespace pe::cpu {

namespace {

constexpr int64_t kBlock = 1024;  // elements per partial sum: the draw recomputes one block's weights

// x[i, i + 8) (the tail padded with -inf) into a vector. Every loop here takes 16 elements as two such
// halves (cpu/vec_clones.h says why), lanes 0-7 and 8-15 of what a 16-lane vector would hold.
__attribute__((always_inline)) inline VF8 load8(const float* x, int64_t i, int64_t n) {
  VF8 v;
  if (n - i >= 8) {
    std::memcpy(&v, x + i, sizeof v);
  } else {
    float b[8];
    for (int j = 0; j < 8; j++) b[j] = i + j < n ? x[i + j] : -std::numeric_limits<float>::infinity();
    std::memcpy(&v, b, sizeof v);
  }
  return v;
}

// The weights of x[i, i + 8): e^((x - top) inv_t), 0 below e^-87.3 (masked tokens: -inf).
__attribute__((always_inline)) inline VF8 weights8(const float* x, int64_t i, int64_t n, float top, float inv_t) {
  const VF8 t = (load8(x, i, n) - top) * inv_t;
  return (VF8)((VI8)(t >= -87.3f) & (VI8)exp_nonpositive8(t));
}

// The weights of x[b, b + kBlock) summed in float (the partial sums softmax_draw and weight_sum share):
// 16 running sums, one per element position mod 16, added in lane order at the end.
__attribute__((always_inline)) inline float block_weight(const float* x, int64_t b, int64_t n, float top, float inv_t) {
  VF8 s0 = VF8{}, s1 = VF8{};
  for (int64_t i = b; i < n && i < b + kBlock; i += 16) {
    s0 += weights8(x, i, n, top, inv_t);
    s1 += weights8(x, i + 8, n, top, inv_t);
  }
  float block = 0;
  for (int j = 0; j < 8; j++) block += s0[j];
  for (int j = 0; j < 8; j++) block += s1[j];
  return block;
}

// The largest element of x[0, n), its first index, and whether every element is finite.
PE_VEC_CLONES float max_finite(const float* x, int64_t n, int64_t* first, bool* finite) {
  VF8 m0 = VF8{} - std::numeric_limits<float>::infinity(), m1 = m0;
  VI8 i0 = VI8{}, i1 = VI8{}, bad = VI8{};
  const VI8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
  for (int64_t i = 0; i < n; i += 16) {
    const VF8 v0 = load8(x, i, n), v1 = load8(x, i + 8, n);
    const VI8 g0 = (VI8)(v0 > m0), g1 = (VI8)(v1 > m1);  // strictly: each lane keeps its first maximum
    m0 = g0 ? v0 : m0, m1 = g1 ? v1 : m1;
    i0 = g0 ? lane + int32_t(i) : i0, i1 = g1 ? lane + int32_t(i + 8) : i1;
    // NaN fails both; an infinity's difference with itself is NaN (the tail's -inf padding is skipped).
    const VF8 d0 = v0 - v0, d1 = v1 - v1;
    bad |= ((VI8)(d0 != d0) | (VI8)(d1 != d1)) & (i + 16 <= n ? VI8{} - 1 : VI8{});
  }
  float top = -std::numeric_limits<float>::infinity();
  bool ok = true;
  for (int j = 0; j < 8; j++) {
    top = m0[j] > top ? m0[j] : top;
    top = m1[j] > top ? m1[j] : top;
    ok = ok && bad[j] == 0;
  }
  int64_t at = n;
  for (int j = 0; j < 8; j++) {
    if (m0[j] == top && i0[j] < at) at = i0[j];
    if (m1[j] == top && i1[j] < at) at = i1[j];
  }
  for (int64_t i = n / 16 * 16; i < n; i++) ok = ok && std::isfinite(x[i]);
  *first = at < n ? at : 0;
  *finite = ok;
  return top;
}

// Appends to `out` the indices of the elements of x[i0, i1) above `cut`, in order. Near a row's maximum
// there are few: 16 elements are compared at once and most groups have none.
PE_VEC_CLONES void indices_above(const float* x, int64_t i0, int64_t i1, float cut, std::vector<int32_t>& out) {
  int64_t i = i0;
  for (; i + 16 <= i1; i += 16) {
    VF8 lo, hi;
    std::memcpy(&lo, x + i, sizeof lo);
    std::memcpy(&hi, x + i + 8, sizeof hi);
    const VI8 a = (VI8)(lo > cut), b = (VI8)(hi > cut), any = a | b;
    uint64_t words[4];
    std::memcpy(words, &any, sizeof words);
    if (!(words[0] | words[1] | words[2] | words[3])) continue;
    for (int j = 0; j < 8; j++)
      if (a[j]) out.push_back(int32_t(i + j));
    for (int j = 0; j < 8; j++)
      if (b[j]) out.push_back(int32_t(i + 8 + j));
  }
  for (; i < i1; i++)
    if (x[i] > cut) out.push_back(int32_t(i));
}

// Drops from `cand` (indices into x, in index order) all but those whose value is at or above the k-th
// largest among them (k or more: ties at it stay), keeping their order; returns that value. The k-th comes
// from the values alone (nth_element over floats: the index tie-break made it a third of the time).
float keep_top_k(const float* x, int64_t k, std::vector<int32_t>& cand, std::vector<float>& vals) {
  vals.resize(cand.size());
  for (size_t i = 0; i < cand.size(); i++) vals[i] = x[cand[i]];
  std::nth_element(vals.begin(), vals.begin() + (k - 1), vals.end(), std::greater<float>());
  const float kth = vals[size_t(k - 1)];
  cand.erase(std::remove_if(cand.begin(), cand.end(), [&](int32_t i) { return x[i] < kth; }), cand.end());
  return kth;
}

// The indices of the k largest elements of the finite x[0, n) (equal values: lower index first), in that
// order, in cand[0, k). One pass keeps the indices above a cut that rises as they come: whenever 4k are
// held, those at or above the k-th's value stay and the cut becomes that value (a later equal value loses
// to the held ones on index). The cut starts 8 below the maximum, where a model's logits usually hold k
// (SmolLM2's, 64 rows of a chat: 14 / 71 / 248 of 49,152 at the 10th / 50th / 90th percentile), then 12
// (193 / 792 / 2,309) and 16 below it, then nowhere. A fixed cut widened to 32 and then to everything put
// the whole row into the sort whenever 8 held fewer than k: 56 us a row at k = 40 and 124 at 128, now 15
// and 32 (Zen 4).
void select_top_k(const float* x, int64_t n, int64_t k, float top, std::vector<int32_t>& cand,
                  std::vector<float>& vals) {
  constexpr int64_t kChunk = 1024;  // elements scanned between checks of the count held
  for (const float start : {top - 8.f, top - 12.f, top - 16.f, -std::numeric_limits<float>::infinity()}) {
    cand.clear();
    float cut = start;
    for (int64_t i = 0; i < n; i += kChunk) {
      indices_above(x, i, std::min(n, i + kChunk), cut, cand);
      if (int64_t(cand.size()) >= 4 * k) cut = keep_top_k(x, k, cand, vals);
    }
    if (int64_t(cand.size()) >= k) break;
  }
  if (int64_t(cand.size()) > k) keep_top_k(x, k, cand, vals);
  auto before = [&](int32_t a, int32_t b) { return x[a] > x[b] || (x[a] == x[b] && a < b); };
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), before);
}

// sum of e^((x - top) inv_t) over x[0, n), in float per 1024 elements and in double across them (as
// softmax_draw sums).
PE_VEC_CLONES double weight_sum(const float* x, int64_t n, float top, float inv_t) {
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) total += block_weight(x, b, n, top, inv_t);
  return total;
}

}  // namespace

// Per row: the maximum, then the k largest by a rising cut (select_top_k), sorted. The GPU kernel
// selects by radix instead (cuda/top_logits.cu); both give the exact k largest in the same order.
void top_logits(Executor& ex, const Tensor& logits, const Tensor& k, const Tensor& inv_t, const Tensor& ids,
                const Tensor& values, const Tensor& stats) {
  const int64_t n_cols = logits.cols;
  const auto* kv = static_cast<const int32_t*>(k.data);
  const float* tv = inv_t.row(0);
  ex.pool().for_range(logits.rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<int32_t> cand;
    std::vector<float> vals;
    for (int64_t r = r0; r < r1; r++) {
      const float* x = logits.row(r);
      auto* id = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(ids.data) + size_t(r) * ids.row_stride);
      float* val = values.row(r);
      bool finite = true;
      int64_t first = 0;
      const float top = max_finite(x, n_cols, &first, &finite);
      stats.row(r)[0] = finite && tv[r] > 0 ? float(weight_sum(x, n_cols, top, tv[r])) : 0.f;
      stats.row(r)[1] = finite ? 0.f : 1.f;
      if (!finite) continue;
      const int64_t kr = kv[r];
      if (kr == 1) {  // greedy: the first maximum
        id[0] = int32_t(first), val[0] = top;
        continue;
      }
      select_top_k(x, n_cols, kr, top, cand, vals);
      for (int64_t j = 0; j < kr; j++) id[j] = cand[size_t(j)], val[j] = x[cand[size_t(j)]];
    }
  });
}

// Three passes over x: the maximum, the weights' sums per block, then the chosen block's weights again,
// walked in order. Nothing is stored but the block sums.
PE_VEC_CLONES int64_t softmax_draw(const float* x, int64_t n, float inv_t, double u) {
  VF8 m0 = VF8{} - std::numeric_limits<float>::infinity(), m1 = m0;
  VI8 nan = VI8{};
  for (int64_t i = 0; i < n; i += 16) {
    const VF8 v0 = load8(x, i, n), v1 = load8(x, i + 8, n);
    m0 = v0 > m0 ? v0 : m0, m1 = v1 > m1 ? v1 : m1;
    nan |= (VI8)(v0 != v0) | (VI8)(v1 != v1);
  }
  float top = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int j = 0; j < 8; j++) {
    top = m0[j] > top ? m0[j] : top;
    top = m1[j] > top ? m1[j] : top;
    any_nan = any_nan || nan[j] != 0;
  }
  if (any_nan || !std::isfinite(top)) return -1;

  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> sums(static_cast<size_t>(n_blocks));
  double total = 0;
  for (int64_t b = 0; b < n_blocks; b++) {
    const float block = block_weight(x, b * kBlock, n, top, inv_t);
    sums[size_t(b)] = block;
    total += block;
  }
  // The first block whose running sum passes u * total (the last non-empty one when rounding leaves
  // the target past them all), then the first element within it.
  const double target = u * total;
  double before = 0;
  int64_t chosen = -1;
  for (int64_t b = 0; b < n_blocks; b++) {
    if (sums[size_t(b)] <= 0) continue;
    chosen = b;
    if (before + sums[size_t(b)] > target) break;
    before += sums[size_t(b)];
  }
  int64_t last = -1;
  double cum = before;
  for (int64_t i = chosen * kBlock; i < n && i < (chosen + 1) * kBlock; i += 8) {
    const VF8 w = weights8(x, i, n, top, inv_t);
    for (int j = 0; j < 8 && i + j < n; j++) {
      if (w[j] <= 0) continue;
      last = i + j;
      cum += w[j];
      if (cum > target) return last;
    }
  }
  return last;  // the walk's sum fell short of the block's by rounding: its last candidate
}

}  // namespace pe::cpu
