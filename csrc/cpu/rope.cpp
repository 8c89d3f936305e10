#include "ops/rope.h"

#include <cmath>
#include <vector>

namespace pe {

void rope(float* x, int64_t n_tokens, int64_t token_stride, int n_heads, int head_dim, const int32_t* pos,
          const RopeParams& p, ThreadPool& pool) {
  const int half = p.n_dims / 2;
  // theta_i = base^(-2i/n_dims), as ggml computes it (powf of the base, not a running product).
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; i++) {
    inv_freq[i] = std::pow(p.freq_base, -2.0f * float(i) / float(p.n_dims));
    if (p.freq_factors) inv_freq[i] /= p.freq_factors[i];
  }
  auto rotate_tokens = [&](int64_t t0, int64_t t1) {
    std::vector<float> cs(half), sn(half);
    for (int64_t t = t0; t < t1; t++) {
      const float position = float(pos[t]) * p.freq_scale;
      for (int i = 0; i < half; i++) {
        const float a = position * inv_freq[i];
        cs[i] = std::cos(a);
        sn[i] = std::sin(a);
      }
      for (int h = 0; h < n_heads; h++) {
        float* v = x + t * token_stride + int64_t(h) * head_dim;
        if (p.style == RopeStyle::Adjacent) {
          for (int i = 0; i < half; i++) {
            const float a = v[2 * i], b = v[2 * i + 1];
            v[2 * i] = a * cs[i] - b * sn[i];
            v[2 * i + 1] = a * sn[i] + b * cs[i];
          }
        } else {
          for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cs[i] - b * sn[i];
            v[i + half] = a * sn[i] + b * cs[i];
          }
        }
      }
    }
  };
  pool.for_range(n_tokens, 4, rotate_tokens);
}

}  // namespace pe
