#include "model/input_stats.h"

#include "common.h"
#include "cpu/quant_search.h"

namespace pe {

void InputStats::add_expert(const void* weight, int64_t cols, int64_t expert, int64_t n_expert, const Tensor& x) {
  PE_CHECK(x.device == Device::CPU && x.type == GGMLType::F32, UnsupportedModelError,
           "input statistics (imatrix) are collected on the CPU only: load the model with n_gpu_layers=0");
  PE_CHECK(x.cols == cols, Error, "input statistics: ", x.cols, " input columns for a weight of ", cols);
  PE_CHECK(expert >= 0 && expert < n_expert, Error, "input statistics: expert ", expert, " of ", n_expert);
  Entry& e = by_weight[weight];
  if (e.sum2.empty()) {
    e.sum2.assign(size_t(n_expert * cols), 0.0);
    e.rows.assign(size_t(n_expert), 0);
  }
  PE_CHECK(e.rows.size() == size_t(n_expert), Error, "input statistics: a weight seen as ", e.rows.size(),
           " and as ", n_expert, " matrices");
  double* acc = e.sum2.data() + expert * cols;
  for (int64_t r = 0; r < x.rows; r++) {
    const float* row = x.row(r);
    for (int64_t j = 0; j < x.cols; j++) acc[j] += double(row[j]) * double(row[j]);
  }
  e.rows[size_t(expert)] += x.rows;
}

void InputStats::add(const Tensor& w, const Tensor& x, ThreadPool* pool) {
  add_expert(w.data, w.cols, 0, 1, x);
  if (!covariance || (!covariance_only.empty() && !covariance_only.count(w.data))) return;
  Entry& e = by_weight[w.data];
  // q, k and v (gate and up) read the same rows one after another: one matrix, updated once per pass.
  const float* in = x.row(0);
  if (in == last_input_ && x.rows == last_rows_ && last_xtx_ && last_xtx_->size() == size_t(w.cols * w.cols)) {
    if (!e.xtx) e.xtx = last_xtx_;
    if (e.xtx == last_xtx_) return;
  }
  if (!e.xtx) e.xtx = std::make_shared<std::vector<float>>(size_t(w.cols * w.cols), 0.0f);
  cpu::accumulate_xtx(in, x.rows, x.ld(), x.cols, e.xtx->data(), pool);
  last_input_ = in;
  last_rows_ = x.rows;
  last_xtx_ = e.xtx;
}

}  // namespace pe
