// The CPU part of the mixture-of-experts op (ops/moe.h): adding up each row's experts.
#include "cpu/ops.h"

namespace pe::cpu {

void moe_combine(Executor& ex, const Tensor& y, const Tensor& slot_t, const Tensor& weight_t, int64_t k,
                 const Tensor& out) {
  const int32_t* slot = static_cast<const int32_t*>(slot_t.data);
  const float* weight = weight_t.row(0);
  for (int64_t i = 0; i < out.rows * k; i++)
    PE_CHECK(slot[i] >= 0 && slot[i] < y.rows, Error, "moe_combine: slot ", slot[i], " at ", i,
             " is out of range [0, ", y.rows, ")");
  ex.pool().for_range(out.rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
      float* o = out.row(r);
      for (int64_t j = 0; j < k; j++) {
        const float w = weight[r * k + j];
        const float* src = y.row(slot[r * k + j]);
        if (j == 0) {
          for (int64_t i = 0; i < out.cols; i++) o[i] = w * src[i];
        } else {
          for (int64_t i = 0; i < out.cols; i++) o[i] += w * src[i];
        }
      }
    }
  });
}

}  // namespace pe::cpu
