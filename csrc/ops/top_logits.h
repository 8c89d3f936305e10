// The few largest logits of each row, for sampling where the logits were computed: a GPU hands the
// host these (kilobytes) instead of whole rows of n_vocab floats, and the sampler needs no more for
// greedy decoding, top-k, and top-p / min-p whose candidates they hold (pyengine/sampling.py).
#pragma once
#include "executor.h"
#include "tensor.h"

namespace pe {

// The most any row may ask for: the GPU kernel sorts its candidates in shared memory.
constexpr int64_t kTopLogitsMax = 256;

// logits: F32 [n x V]. k: I32 [1 x n], each in [1, min(V, k_max)]. inv_t: F32 [1 x n], each >= 0.
// ids: I32 [n x k_max], values: F32 [n x k_max]: row r's k[r] largest logits and their column
// indices, largest first, equal values lower index first (the order of a stable descending sort);
// entries past k[r] are left as they were.
// stats: F32 [n x 2]: [0] the row's sum of e^((x - max) * inv_t[r]) (0 when inv_t[r] is 0), what
// top-p normalises by; [1] 1 when the row holds a NaN or an infinity (ids and values are then
// unspecified), else 0.
void top_logits(Executor& ex, const Tensor& logits, const Tensor& k, const Tensor& inv_t, const Tensor& ids,
                const Tensor& values, const Tensor& stats);

}  // namespace pe
