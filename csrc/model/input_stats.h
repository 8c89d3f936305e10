// Per-column statistics of what every linear layer reads: llama.cpp's importance matrix (tools/imatrix),
// collected by a context while it runs a calibration text. A weight's column j multiplies input
// channel j, so sum_rows x_j^2 says how much a quantization error in that column costs on this text.
#pragma once
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "tensor.h"

namespace pe {

struct InputStats {
  // One matrix, or n_mat of them for a 3-D tensor of experts (llama-imatrix's layout: one vector of
  // sums and one count per expert, since each expert sees only the rows routed to it).
  struct Entry {
    std::vector<double> sum2;   // [n_mat * n_cols]: per matrix and input column, sum over rows of x^2
    std::vector<int64_t> rows;  // [n_mat]: rows summed into each matrix
  };
  // Keyed by the weight's data (for experts: the whole stacked tensor's), which the model maps back to
  // the tensor's name.
  std::unordered_map<const void*, Entry> by_weight;

  // Adds the rows of x (F32 on the CPU), the input of the linear layer with weight w.
  void add(const Tensor& w, const Tensor& x) { add_expert(w.data, w.cols, 0, 1, x); }
  // Adds the rows of x, routed to matrix `expert` of the n_expert stacked in the tensor at `weight`.
  void add_expert(const void* weight, int64_t cols, int64_t expert, int64_t n_expert, const Tensor& x);
};

}  // namespace pe
