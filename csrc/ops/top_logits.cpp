#include "ops/top_logits.h"

#include "ops/dispatch.h"

namespace pe {

void top_logits(Executor& ex, const Tensor& logits, const Tensor& k, const Tensor& inv_t, const Tensor& ids,
                const Tensor& values, const Tensor& stats) {
  const int64_t n = logits.rows, k_max = ids.cols;
  check_f32(ex, logits, n, logits.cols, "top_logits: logits");
  check_i32(ex, k, n, "top_logits: k");
  check_f32(ex, inv_t, 1, n, "top_logits: inv_t");
  check_device(ex, ids, "top_logits: ids");
  PE_CHECK(ids.type == GGMLType::I32 && ids.rows == n && k_max >= 1 && k_max <= kTopLogitsMax &&
               (n == 0 || (ids.data && ids.row_stride >= size_t(k_max) * sizeof(int32_t))),
           Error, "top_logits: ids must be I32 [", n, " x k_max], k_max in [1, ", kTopLogitsMax, "]");
  check_f32(ex, values, n, k_max, "top_logits: values");
  check_f32(ex, stats, n, 2, "top_logits: stats");
  PE_CHECK(logits.cols >= 1, Error, "top_logits: empty rows");
  if (n == 0) return;
  PE_DISPATCH(ex, top_logits, ex, logits, k, inv_t, ids, values, stats);
}

}  // namespace pe
