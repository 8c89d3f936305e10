#include <cmath>

#include "cpu/ops.h"

namespace pe::cpu {

void norm(Executor& ex, NormType type, const Tensor& x, const Tensor& residual, const Tensor& w, const Tensor& b,
          const Tensor& y, float eps) {
  const int64_t d = x.cols;
  const float* wv = w.row(0);
  const float* bv = b.empty() ? nullptr : b.row(0);
  ex.pool().for_range(x.rows, ThreadPool::min_rows_for(x.cols), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* xr = x.row(r);
      float* yr = y.row(r);
      if (!residual.empty()) {
        const float* rr = residual.row(r);  // may be yr: read here, before yr is written
        for (int64_t i = 0; i < d; i++) xr[i] += rr[i];
      }
      if (type == NormType::RMS) {
        double ss = 0;  // double: d can be thousands and activations large
        for (int64_t i = 0; i < d; i++) ss += double(xr[i]) * xr[i];
        const float s = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
        for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * s * wv[i];
      } else {
        double sum = 0;
        for (int64_t i = 0; i < d; i++) sum += xr[i];
        const float mean = float(sum / double(d));
        double var = 0;
        for (int64_t i = 0; i < d; i++) var += double(xr[i] - mean) * (xr[i] - mean);
        const float s = float(1.0 / std::sqrt(var / double(d) + double(eps)));
        for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] - mean) * s * wv[i] + (bv ? bv[i] : 0.f);
      }
    }
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
