#include "cpu/sampling.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/vec_clones.h"

namespace pe::cpu {

namespace {

constexpr int64_t kBlock = 1024;  // elements per partial sum: the draw recomputes one block's weights

// x[i, i + 16) (the tail padded with -inf) into a vector.
__attribute__((always_inline)) inline VF load16(const float* x, int64_t i, int64_t n) {
  VF v;
  if (n - i >= 16) {
    std::memcpy(&v, x + i, sizeof v);
  } else {
    float b[16];
    for (int j = 0; j < 16; j++) b[j] = i + j < n ? x[i + j] : -std::numeric_limits<float>::infinity();
    std::memcpy(&v, b, sizeof v);
  }
  return v;
}

// The weights of x[i, i + 16): e^((x - top) inv_t), 0 below e^-87.3 (masked tokens: -inf).
__attribute__((always_inline)) inline VF weights16(const float* x, int64_t i, int64_t n, float top, float inv_t) {
  const VF t = (load16(x, i, n) - top) * inv_t;
  return (VF)((VI)(t >= -87.3f) & (VI)exp_nonpositive16(t));
}

}  // namespace

// Three passes over x: the maximum, the weights' sums per block, then the chosen block's weights again,
// walked in order. Nothing is stored but the block sums.
PE_VEC_CLONES int64_t softmax_draw(const float* x, int64_t n, float inv_t, double u) {
  VF mv = VF{} - std::numeric_limits<float>::infinity();
  VI nan = VI{};
  for (int64_t i = 0; i < n; i += 16) {
    const VF v = load16(x, i, n);
    mv = v > mv ? v : mv;
    nan |= (VI)(v != v);
  }
  float top = -std::numeric_limits<float>::infinity();
  bool any_nan = false;
  for (int j = 0; j < 16; j++) {
    top = mv[j] > top ? mv[j] : top;
    any_nan = any_nan || nan[j] != 0;
  }
  if (any_nan || !std::isfinite(top)) return -1;

  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
  std::vector<double> sums(static_cast<size_t>(n_blocks));
  double total = 0;
  for (int64_t b = 0; b < n_blocks; b++) {
    VF s = VF{};
    for (int64_t i = b * kBlock; i < n && i < (b + 1) * kBlock; i += 16) s += weights16(x, i, n, top, inv_t);
    float block = 0;
    for (int j = 0; j < 16; j++) block += s[j];
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
  for (int64_t i = chosen * kBlock; i < n && i < (chosen + 1) * kBlock; i += 16) {
    const VF w = weights16(x, i, n, top, inv_t);
    for (int j = 0; j < 16 && i + j < n; j++) {
      if (w[j] <= 0) continue;
      last = i + j;
      cum += w[j];
      if (cum > target) return last;
    }
  }
  return last;  // the walk's sum fell short of the block's by rounding: its last candidate
}

}  // namespace pe::cpu
