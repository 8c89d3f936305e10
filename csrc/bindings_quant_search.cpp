// Calibrated quantization with error feedback (cpu/quant_search.h) on numpy arrays: `pyengine quantize
// --calibration`'s back end.
#include <pybind11/numpy.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.h"
#include "bindings_quantize.h"
#include "common.h"
#include "cpu/quant_search.h"
#include "cpu/quantize.h"
#include "threadpool.h"

namespace py = pybind11;

namespace pe {

namespace {

ThreadPool* shared_pool(int n_threads, std::unique_lock<std::mutex>& lock) {
  static std::mutex mu;
  static std::unique_ptr<ThreadPool> pool;
  lock = std::unique_lock<std::mutex>(mu);
  if (n_threads <= 1) return nullptr;
  if (!pool || pool->size() != n_threads) pool = std::make_unique<ThreadPool>(n_threads);
  return pool.get();
}

// q/k/v (gate/up) share one covariance: the last few plans are kept, each found again only if the
// matrix it was made from is equal value for value (a freed array's address can come back with new data).
std::shared_ptr<const cpu::FeedbackPlan> cached_plan(const float* h, int64_t n, int64_t block, double damp,
                                                     ThreadPool* pool) {
  struct Entry {
    int64_t block;
    double damp;
    std::shared_ptr<const cpu::FeedbackPlan> plan;
  };
  static std::vector<Entry> cache;  // guarded by shared_pool's mutex, held by the caller
  for (const Entry& e : cache) {
    if (e.block != block || e.damp != damp || e.plan->n != n) continue;
    bool same = true;
    for (int64_t i = 0; i < n && same; i++)
      same = std::equal(h + i * n + i, h + (i + 1) * n, e.plan->h.data() + i * n + i);
    if (same) return e.plan;
  }
  auto plan = std::make_shared<const cpu::FeedbackPlan>(cpu::make_feedback_plan(h, n, block, damp, pool));
  if (cache.size() >= 4) cache.erase(cache.begin());
  cache.push_back({block, damp, plan});
  return plan;
}

py::tuple quantize_feedback(const F32Array& x, uint32_t type_id, const F32Array& hessian, const py::object& importance,
                            double damp, int n_threads, const std::string& name) {
  const std::string what = name.empty() ? std::string("tensor") : "tensor " + name;
  const TypeTraits* tr = type_traits(type_id);
  PE_CHECK(tr && cpu::can_quantize(GGMLType(type_id)), UnsupportedModelError, what, ": cannot quantize to type ",
           tr ? tr->name : std::to_string(type_id).c_str());
  PE_CHECK(x.ndim() == 2, ModelFormatError, what, ": error feedback takes a 2-d array, not ", x.ndim(), "-d");
  const int64_t rows = x.shape(0), cols = x.shape(1);
  PE_CHECK(cols > 0 && cols % tr->block_size == 0, ModelFormatError, what, ": rows of ", cols,
           " elements are not a multiple of the ", tr->name, " block size ", tr->block_size);
  PE_CHECK(hessian.ndim() == 2 && hessian.shape(0) == cols && hessian.shape(1) == cols, ModelFormatError, what,
           ": the input covariance must be ", cols, " x ", cols);
  PE_CHECK(damp >= 0, Error, what, ": dampening ", damp, " is negative");
  F32Array imp;
  const float* qw = importance_vector(importance, cols, what, imp);
  const size_t rb = row_bytes(GGMLType(type_id), cols);
  py::array_t<uint8_t> out({py::ssize_t(rows), py::ssize_t(rb)});
  const float* src = x.data();
  uint8_t* dst = out.mutable_data();
  std::atomic<int64_t> kept{0};
  {
    py::gil_scoped_release release;
    if (n_threads <= 0) n_threads = physical_core_count();
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(16, rows / (8 * int64_t(n_threads)) + 1));
    const int64_t n_chunks = (rows + chunk - 1) / chunk;
    std::unique_lock<std::mutex> lock;
    ThreadPool* pool = shared_pool(n_threads, lock);
    const auto plan_ptr = cached_plan(hessian.data(), cols, tr->block_size, damp, pool);
    const cpu::FeedbackPlan& plan = *plan_ptr;
    auto run = [&](int64_t c) {
      const int64_t r0 = c * chunk, n = std::min(chunk, rows - r0);
      kept += cpu::quantize_rows_feedback(GGMLType(type_id), plan, src + r0 * cols, n, qw, dst + size_t(r0) * rb);
    };
    if (pool)
      pool->for_each_dynamic(n_chunks, run);
    else
      for (int64_t c = 0; c < n_chunks; ++c) run(c);
  }
  return py::make_tuple(out, kept.load());
}

py::array_t<double> weighted_errors(const F32Array& err, const F32Array& hessian) {
  PE_CHECK(err.ndim() == 2 && hessian.ndim() == 2 && hessian.shape(0) == err.shape(1) &&
               hessian.shape(1) == err.shape(1),
           Error, "weighted_errors: errors (rows, n) and a covariance (n, n)");
  const int64_t rows = err.shape(0), n = err.shape(1);
  cpu::FeedbackPlan plan;
  plan.n = n;
  plan.h.assign(hessian.data(), hessian.data() + n * n);
  for (int64_t i = 0; i < n; i++)  // symmetric from the upper triangle, as make_feedback_plan reads it
    for (int64_t j = 0; j < i; j++) plan.h[size_t(i * n + j)] = plan.h[size_t(j * n + i)];
  py::array_t<double> out(rows);
  for (int64_t r = 0; r < rows; r++) out.mutable_data()[r] = cpu::weighted_error(plan, err.data() + r * n);
  return out;
}

py::array_t<float> xtx(const F32Array& x, int n_threads) {
  PE_CHECK(x.ndim() == 2, Error, "xtx: a 2-d array");
  const int64_t rows = x.shape(0), n = x.shape(1);
  py::array_t<float> h({py::ssize_t(n), py::ssize_t(n)});
  std::fill(h.mutable_data(), h.mutable_data() + n * n, 0.0f);
  {
    py::gil_scoped_release release;
    std::unique_lock<std::mutex> lock;
    ThreadPool* pool = shared_pool(n_threads <= 0 ? physical_core_count() : n_threads, lock);
    cpu::accumulate_xtx(x.data(), rows, n, n, h.mutable_data(), pool);
  }
  return h;
}

}  // namespace

void bind_quant_search(py::module_& m) {
  m.def("quantize_feedback", &quantize_feedback, py::arg("x"), py::arg("type_id"), py::arg("hessian"),
        py::arg("importance") = py::none(), py::arg("damp") = 0.01, py::arg("n_threads") = 0, py::arg("name") = "",
        "Quantize float rows x (rows, cols) to ggml blocks of `type_id` with error feedback over the input\n"
        "covariance `hessian` (cols x cols, sums of x^T x over calibration inputs; the upper triangle is read),\n"
        "block by block with ggml's quantizer weighted by `importance` (per-column, e.g. an imatrix entry).\n"
        "Each row keeps ggml's plain result where that has the lower e H e^T. Returns (uint8 (rows, row_bytes),\n"
        "number of rows that kept ggml's plain result).");
  m.def("weighted_errors", &weighted_errors, py::arg("errors"), py::arg("hessian"),
        "e H e^T for every row e of `errors` (float64), H symmetric from its upper triangle.");
  m.def("xtx", &xtx, py::arg("x"), py::arg("n_threads") = 0,
        "x^T x of a float array (rows, n): the upper triangle (j >= i) filled, the rest zero.");
}

}  // namespace pe
