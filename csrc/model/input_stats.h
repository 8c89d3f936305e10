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
  struct Entry {
    std::vector<double> sum2;  // per input column: sum over rows of x^2
    int64_t rows = 0;
  };
  // Keyed by the weight's data, which the model maps back to the tensor's name.
  std::unordered_map<const void*, Entry> by_weight;

  // Adds the rows of x (F32 on the CPU), the input of the linear layer with weight w.
  void add(const Tensor& w, const Tensor& x);
};

}  // namespace pe
