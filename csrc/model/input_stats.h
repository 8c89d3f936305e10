// Per-column statistics of what every linear layer reads: llama.cpp's importance matrix (tools/imatrix),
// collected by a context while it runs a calibration text. A weight's column j multiplies input
// channel j, so sum_rows x_j^2 says how much a quantization error in that column costs on this text.
#pragma once
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "tensor.h"

namespace pe {

class ThreadPool;

struct InputStats {
  // One matrix, or n_mat of them for a 3-D tensor of experts (llama-imatrix's layout: one vector of
  // sums and one count per expert, since each expert sees only the rows routed to it).
  struct Entry {
    std::vector<double> sum2;   // [n_mat * n_cols]: per matrix and input column, sum over rows of x^2
    std::vector<int64_t> rows;  // [n_mat]: rows summed into each matrix
    // With `covariance`: x^T x (cols x cols, upper triangle), the Hessian of the layer's output error that
    // error-feedback quantization (cpu/quant_search.h) needs. Dense layers only (experts fall back to ggml's
    // search); layers that read the same input (q/k/v, gate/up) share one.
    std::shared_ptr<std::vector<float>> xtx;
  };
  // Keyed by the weight's data (for experts: the whole stacked tensor's), which the model maps back to
  // the tensor's name.
  std::unordered_map<const void*, Entry> by_weight;
  bool covariance = false;
  // With `covariance`: when not empty, the only weights (by data) that get an x^T x, so that a calibration
  // can collect a few layers' matrices per pass and hold no more than those.
  std::unordered_set<const void*> covariance_only;

  // Adds the rows of x (F32 on the CPU), the input of the linear layer with weight w; `pool` (or nullptr)
  // runs the covariance update.
  void add(const Tensor& w, const Tensor& x, ThreadPool* pool = nullptr);
  // Adds the rows of x, routed to matrix `expert` of the n_expert stacked in the tensor at `weight`.
  void add_expert(const void* weight, int64_t cols, int64_t expert, int64_t n_expert, const Tensor& x);

 private:
  const float* last_input_ = nullptr;  // the input the last covariance update read, and its matrix
  int64_t last_rows_ = 0;
  std::shared_ptr<std::vector<float>> last_xtx_;
};

}  // namespace pe
