#include <cmath>
#include <vector>

#include "cpu/ops.h"

namespace pe::cpu {

void rope(Executor& ex, const Tensor& x, int n_heads, int head_dim, int first_dim, const Tensor& pos_t,
          const RopeParams& p) {
  const int half = p.n_dims / 2;
  const int32_t* pos = static_cast<const int32_t*>(pos_t.data);
  // theta_i = base^(-2i/n_dims), as ggml computes it (powf of the base, not a running product).
  std::vector<float> inv_freq(half);
  for (int i = 0; i < half; i++) {
    inv_freq[i] = std::pow(p.freq_base, -2.0f * float(i) / float(p.n_dims));
    if (p.freq_factors) inv_freq[i] /= p.freq_factors[i];
  }
  ex.pool().for_range(x.rows, 4, [&](int64_t t0, int64_t t1) {
    std::vector<float> cs(half), sn(half);
    for (int64_t t = t0; t < t1; t++) {
      const float position = float(pos[t]) * p.freq_scale;
      for (int i = 0; i < half; i++) {
        const float a = position * inv_freq[i];
        cs[i] = std::cos(a) * p.attn_factor;
        sn[i] = std::sin(a) * p.attn_factor;
      }
      for (int h = 0; h < n_heads; h++) {
        float* v = x.row(t) + int64_t(h) * head_dim + first_dim;
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
  });
}

}  // namespace pe::cpu
