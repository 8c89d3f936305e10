#include "ops/moe.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "ops/dispatch.h"
#include "ops/elementwise.h"
#include "ops/matmul.h"
#include "model/input_stats.h"

namespace pe {

void MoEScratch::reserve(const MoEParams& p, int64_t n_embd, int64_t n, Device device) {
  for (Buffer* b : {&logits, &x, &gate, &up, &y, &rows})
    if (b->device() != device) *b = Buffer(device, 0);
  const size_t f = sizeof(float) * size_t(n);
  logits.reserve(f * size_t(p.n_expert));
  x.reserve(f * size_t(n_embd));
  gate.reserve(f * size_t(p.n_ff));
  up.reserve(f * size_t(p.n_ff));
  y.reserve(f * size_t(p.n_used * n_embd));
  rows.reserve(3 * f * size_t(p.n_used));  // gather ids, combine slots, combine weights: 4 bytes each
}

void moe_combine(Executor& ex, const Tensor& y, const Tensor& slot, const Tensor& weight, int64_t k,
                 const Tensor& out) {
  PE_CHECK(k > 0, Error, "moe_combine: k = ", k, " must be positive");
  check_f32(ex, y, y.rows, out.cols, "moe_combine: y");
  check_f32(ex, out, out.rows, out.cols, "moe_combine: out");
  check_i32(ex, slot, out.rows * k, "moe_combine: slot");
  check_f32(ex, weight, 1, out.rows * k, "moe_combine: weight");
  if (out.rows == 0) return;
  PE_DISPATCH(ex, moe_combine, ex, y, slot, weight, k, out);
}

namespace {

void check_experts(const Experts& w, const MoEParams& p, int64_t d) {
  PE_CHECK(p.n_expert > 0 && p.n_used > 0 && p.n_used <= p.n_expert && p.n_ff > 0, Error, "moe: ", p.n_used,
           " of ", p.n_expert, " experts of ", p.n_ff, " is not a valid configuration");
  auto shape = [](const Tensor& t, int64_t rows, int64_t cols, const char* what) {
    PE_CHECK(t.rows == rows && t.cols == cols, Error, "moe: ", what, " is ", t.rows, " x ", t.cols, ", expected ",
             rows, " x ", cols);
  };
  shape(w.router, p.n_expert, d, "the router");
  shape(w.gate, p.n_expert * p.n_ff, d, "the experts' gate");
  shape(w.up, p.n_expert * p.n_ff, d, "the experts' up");
  shape(w.down, p.n_expert * d, p.n_ff, "the experts' down");
}

}  // namespace

void moe_ffn(Executor& ex, const Experts& w, const MoEParams& p, const Tensor& x, const Tensor& out, MoEScratch& s,
             const std::string& name, InputStats* stats) {
  const Device dev = ex.device();
  const int64_t n = x.rows, d = x.cols, n_expert = p.n_expert, k = p.n_used, n_ff = p.n_ff;
  check_experts(w, p, d);
  check_f32(ex, x, n, d, "moe: x");
  check_f32(ex, out, n, d, "moe: out");
  PE_CHECK(n == 0 || x.data != out.data, Error, "moe: out must not alias x");
  if (n == 0) return;
  s.reserve(p, d, n, dev);

  // The router's logits, read on the host, which chooses.
  const Tensor logits = f32_tensor(static_cast<float*>(s.logits.data()), n, n_expert, n_expert, dev);
  if (stats) stats->add(w.router, x);
  matmul(ex, w.router, x, logits);
  s.host_logits.resize(size_t(n * n_expert));
  copy_between(ex, Device::CPU, s.host_logits.data(), dev, logits.data, size_t(n * n_expert) * sizeof(float));

  // Each row's experts, best first (top-k of the softmax = of the logits), and their weights: the
  // softmax probabilities, renormalised over the chosen ones (norm_topk_prob).
  std::vector<int32_t> chosen(static_cast<size_t>(n * k));
  std::vector<int32_t> order(static_cast<size_t>(n_expert));
  std::vector<float> weight(static_cast<size_t>(n * k));
  for (int64_t r = 0; r < n; r++) {
    const float* l = s.host_logits.data() + r * n_expert;
    for (int64_t e = 0; e < n_expert; e++)
      PE_CHECK(std::isfinite(l[e]), NumericalError, "non-finite values (NaN or Inf) in the router logits of ", name,
               " (", name, ".ffn_gate_inp): its weights or the layer's input hold NaN/Inf");
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int32_t a, int32_t b) { return l[a] > l[b] || (l[a] == l[b] && a < b); });
    const double top = l[order[0]];
    double total = 0, picked = 0;
    for (int64_t e = 0; e < n_expert; e++) total += std::exp(double(l[e]) - top);
    for (int64_t j = 0; j < k; j++) picked += std::exp(double(l[order[size_t(j)]]) - top);
    const double denom = p.norm_weights ? picked : total;
    for (int64_t j = 0; j < k; j++) {
      chosen[size_t(r * k + j)] = order[size_t(j)];
      weight[size_t(r * k + j)] = float(std::exp(double(l[order[size_t(j)]]) - top) / denom);
    }
  }

  // Rows grouped by expert (in row order within an expert): expert e's rows are [start[e], start[e + 1]) of
  // the gathered inputs and of the stacked outputs y; slot[r * k + j] is where row r's j-th expert put it.
  std::vector<int64_t> start(static_cast<size_t>(n_expert + 1), 0);
  std::vector<int64_t> filled(static_cast<size_t>(n_expert), 0);
  for (int32_t e : chosen) start[size_t(e) + 1]++;
  for (int64_t e = 0; e < n_expert; e++) start[size_t(e + 1)] += start[size_t(e)];
  const int64_t nk = n * k;
  s.host_rows.resize(size_t(3 * nk));
  int32_t* gather = s.host_rows.data();
  int32_t* slot = gather + nk;
  float* combine = reinterpret_cast<float*>(slot + nk);
  for (int64_t i = 0; i < nk; i++) {
    const int32_t e = chosen[size_t(i)];
    const int64_t at = start[size_t(e)] + filled[size_t(e)]++;
    gather[at] = int32_t(i / k);
    slot[i] = int32_t(at);
    combine[i] = weight[size_t(i)];
  }
  int32_t* rows = static_cast<int32_t*>(dev == Device::CPU ? s.host_rows.data() : s.rows.data());
  if (dev != Device::CPU) copy_between(ex, dev, rows, Device::CPU, s.host_rows.data(), size_t(3 * nk) * sizeof(int32_t));
  auto i32 = [&](int32_t* data, int64_t len) { return Tensor{GGMLType::I32, data, 1, len, size_t(len) * 4, dev}; };

  // Each chosen expert once, on all its rows: gate, up, act(gate) * up, down.
  const Tensor y = f32_tensor(static_cast<float*>(s.y.data()), nk, d, d, dev);
  for (int64_t e = 0; e < n_expert; e++) {
    const int64_t m = start[size_t(e + 1)] - start[size_t(e)];
    if (m == 0) continue;
    const Tensor xe = f32_tensor(static_cast<float*>(s.x.data()), m, d, d, dev);
    const Tensor g = f32_tensor(static_cast<float*>(s.gate.data()), m, n_ff, n_ff, dev);
    const Tensor u = f32_tensor(static_cast<float*>(s.up.data()), m, n_ff, n_ff, dev);
    get_rows(ex, x, i32(rows + start[size_t(e)], m), xe);
    if (stats) {
      stats->add_expert(w.gate.data, d, e, n_expert, xe);
      stats->add_expert(w.up.data, d, e, n_expert, xe);
    }
    matmul(ex, w.gate.rows_view(e * n_ff, n_ff), xe, g);
    matmul(ex, w.up.rows_view(e * n_ff, n_ff), xe, u);
    gated_activation(ex, p.act, g, u, g);
    if (stats) stats->add_expert(w.down.data, n_ff, e, n_expert, g);
    matmul(ex, w.down.rows_view(e * d, d), g, y.rows_view(start[size_t(e)], m));
  }
  moe_combine(ex, y, i32(rows + nk, nk), f32_tensor(reinterpret_cast<float*>(rows + 2 * nk), 1, nk, nk, dev), k, out);
}

}  // namespace pe
