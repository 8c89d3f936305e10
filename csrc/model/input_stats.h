// Per-column statistics of what every linear layer reads: llama.cpp's importance matrix (tools/imatrix),
// collected by a context while it runs a calibration text. A weight's column j multiplies input
// channel j, so sum_rows x_j^2 says how much a quantization error in that column costs on this text.
#pragma once
#include <cstdint>
#include <memory>
#include <unordered_map>
#include <vector>

#include "tensor.h"

namespace pe {

class ThreadPool;

struct InputStats {
  struct Entry {
    std::vector<double> sum2;  // per input column: sum over rows of x^2
    int64_t rows = 0;
    // With `covariance`: x^T x (cols x cols, upper triangle), the Hessian of the layer's output error that
    // error-feedback quantization (cpu/quant_search.h) needs. Layers that read the same input (q/k/v,
    // gate/up) share one.
    std::shared_ptr<std::vector<float>> xtx;
  };
  // Keyed by the weight's data, which the model maps back to the tensor's name.
  std::unordered_map<const void*, Entry> by_weight;
  bool covariance = false;

  // Adds the rows of x (F32 on the CPU), the input of the linear layer with weight w; `pool` (or nullptr)
  // runs the covariance update.
  void add(const Tensor& w, const Tensor& x, ThreadPool* pool = nullptr);

 private:
  const float* last_input_ = nullptr;  // the input the last covariance update read, and its matrix
  int64_t last_rows_ = 0;
  std::shared_ptr<std::vector<float>> last_xtx_;
};

}  // namespace pe
