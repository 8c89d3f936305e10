#include <cmath>

#include "cpu/ops.h"
#include "cpu/vec_clones.h"

namespace pe::cpu {

namespace {

typedef double VD __attribute__((vector_size(64)));

// x[i] - c over a row, summed (power 1) or squared and summed (power 2), in double: d can be thousands
// and activations large. 16 floats at a time, each half widened to 8 doubles (the scalar loop this
// replaces was a tenth of a SmolLM2 decode step's serial time at 8 rows).
template <int kPower>
__attribute__((always_inline)) inline double sum_row(const float* x, int64_t d, float c) {
  VD lo = {}, hi = {};
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    VF v;
    __builtin_memcpy(&v, x + i, sizeof v);
    v -= c;
    const VD a = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), VD);
    const VD b = __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15), VD);
    lo += kPower == 2 ? a * a : a;
    hi += kPower == 2 ? b * b : b;
  }
  double s = 0;
  for (int j = 0; j < 8; j++) s += lo[j] + hi[j];
  for (; i < d; i++) {
    const double v = double(x[i] - c);
    s += kPower == 2 ? v * v : v;
  }
  return s;
}

// One row: x += r (when r is given), then y = (x - mean) * s * w + b.
PE_VEC_CLONES void norm_row(bool rms, float* x, const float* r, const float* w, const float* b, float* y, int64_t d,
                            float eps) {
  if (r)  // may be y: read here, before y is written
    for (int64_t i = 0; i < d; i++) x[i] += r[i];
  const float mean = rms ? 0.f : float(sum_row<1>(x, d, 0.f) / double(d));
  const float s = float(1.0 / std::sqrt(sum_row<2>(x, d, mean) / double(d) + double(eps)));
  if (b)
    for (int64_t i = 0; i < d; i++) y[i] = (x[i] - mean) * s * w[i] + b[i];
  else
    for (int64_t i = 0; i < d; i++) y[i] = (x[i] - mean) * s * w[i];
}

}  // namespace

void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& residual, const Tensor& w, const Tensor& b,
          const Tensor& y, float eps) {
  const float* wv = w.row(0);
  const float* bv = b.empty() ? nullptr : b.row(0);
  ex.pool().for_range(x.rows, ThreadPool::min_rows_for(x.cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++)
      norm_row(type == NormType::RMS, x.row(r), residual.empty() ? nullptr : residual.row(r), wv, bv, y.row(r),
               x.cols, eps);
  });
}

void norm_heads(Executor& ex, const Tensor& x, int n_heads, const Tensor& w, float eps) {
  const int64_t hd = x.cols / n_heads;
  const float* wv = w.row(0);
  ex.pool().for_range(x.rows, ThreadPool::min_rows_for(x.cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      for (int h = 0; h < n_heads; h++) {
        float* v = x.row(r) + h * hd;
        double ss = 0;
        for (int64_t i = 0; i < hd; i++) ss += double(v[i]) * v[i];
        const float s = float(1.0 / std::sqrt(ss / double(hd) + double(eps)));
        for (int64_t i = 0; i < hd; i++) v[i] = v[i] * s * wv[i];
      }
    }
  });
}

}  // namespace pe::cpu
