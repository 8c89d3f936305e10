#include "ops/rope.h"

#include <cmath>

#include "ops/dispatch.h"

namespace pe {

void rope(Executor& ex, const Tensor& x, int n_heads, int head_dim, int first_dim, const Tensor& pos,
          const RopeParams& p) {
  check_f32(ex, x, x.rows, int64_t(n_heads) * head_dim, "rope: x");
  check_i32(ex, pos, x.rows, "rope: positions");
  PE_CHECK(p.n_dims > 0 && p.n_dims % 2 == 0 && first_dim >= 0 && first_dim + p.n_dims <= head_dim, Error,
           "rope: ", p.n_dims, " rotated dims from dim ", first_dim, " do not fit a head of ", head_dim);
  PE_CHECK(std::isfinite(p.attn_factor) && p.attn_factor > 0, Error, "rope: attention factor ", p.attn_factor,
           " must be positive and finite");
  if (x.rows == 0) return;
  PE_DISPATCH(ex, rope, ex, x, n_heads, head_dim, first_dim, pos, p);
}

}  // namespace pe
