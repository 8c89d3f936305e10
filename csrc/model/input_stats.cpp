#include "model/input_stats.h"

#include "common.h"

namespace pe {

void InputStats::add(const Tensor& w, const Tensor& x) {
  PE_CHECK(x.device == Device::CPU && x.type == GGMLType::F32, UnsupportedModelError,
           "input statistics (imatrix) are collected on the CPU only: load the model with n_gpu_layers=0");
  PE_CHECK(x.cols == w.cols, Error, "input statistics: ", x.cols, " input columns for a weight of ", w.cols);
  Entry& e = by_weight[w.data];
  if (e.sum2.empty()) e.sum2.assign(size_t(w.cols), 0.0);
  for (int64_t r = 0; r < x.rows; r++) {
    const float* row = x.row(r);
    for (int64_t j = 0; j < x.cols; j++) e.sum2[size_t(j)] += double(row[j]) * double(row[j]);
  }
  e.rows += x.rows;
}

}  // namespace pe
