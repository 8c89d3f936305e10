#include "ops/norm.h"

#include <cmath>

namespace pe {

void rms_norm(const float* x, const float* w, float* y, int64_t n, int64_t d, float eps, ThreadPool& pool) {
  pool.for_range(n, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* xr = x + r * d;
      float* yr = y + r * d;
      double ss = 0;  // double: d can be thousands and activations large
      for (int64_t i = 0; i < d; i++) ss += double(xr[i]) * xr[i];
      const float scale = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
      for (int64_t i = 0; i < d; i++) yr[i] = xr[i] * scale * w[i];
    }
  });
}

void layer_norm(const float* x, const float* w, const float* b, float* y, int64_t n, int64_t d, float eps,
                ThreadPool& pool) {
  pool.for_range(n, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      const float* xr = x + r * d;
      float* yr = y + r * d;
      double sum = 0;
      for (int64_t i = 0; i < d; i++) sum += xr[i];
      const float mean = float(sum / double(d));
      double var = 0;
      for (int64_t i = 0; i < d; i++) var += double(xr[i] - mean) * (xr[i] - mean);
      const float scale = float(1.0 / std::sqrt(var / double(d) + double(eps)));
      for (int64_t i = 0; i < d; i++) yr[i] = (xr[i] - mean) * scale * w[i] + (b ? b[i] : 0.f);
    }
  });
}

}  // namespace pe
