// Quantizers on numpy arrays: the converter's and `pyengine quantize`'s back end.
#include <pybind11/numpy.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "cpu/quantize.h"
#include "threadpool.h"

namespace py = pybind11;

namespace pe {

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

py::array_t<uint8_t> quantize(const F32Array& x, uint32_t type_id, const py::object& importance, int n_threads,
                              const std::string& name) {
  const std::string what = name.empty() ? std::string("tensor") : "tensor " + name;
  const TypeTraits* tr = type_traits(type_id);
  PE_CHECK(tr && cpu::can_quantize(GGMLType(type_id)), UnsupportedModelError, what, ": cannot quantize to type ",
           tr ? tr->name : std::to_string(type_id).c_str());
  PE_CHECK(x.ndim() >= 1, ModelFormatError, what, ": cannot quantize a 0-d array");
  const int64_t cols = x.shape(x.ndim() - 1);
  PE_CHECK(cols > 0 && cols % tr->block_size == 0, ModelFormatError, what, ": rows of ", cols,
           " elements are not a multiple of the ", tr->name, " block size ", tr->block_size);
  const int64_t rows = cols ? int64_t(x.size()) / cols : 0;
  F32Array imp;
  const float* qw = nullptr;
  if (!importance.is_none()) {
    imp = F32Array::ensure(importance);
    PE_CHECK(imp && imp.ndim() == 1 && imp.shape(0) == cols, ModelFormatError, what, ": importance has ",
             imp ? int64_t(imp.size()) : int64_t(-1), " values for ", cols, " columns");
    qw = imp.data();
  }
  const size_t rb = row_bytes(GGMLType(type_id), cols);
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  shape.back() = py::ssize_t(rb);
  py::array_t<uint8_t> out(shape);
  const float* src = x.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (n_threads <= 0) n_threads = physical_core_count();
    // rows of uneven cost (all-zero rows are quick): threads take chunks of rows as they finish
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(16, rows / (8 * int64_t(n_threads)) + 1));
    const int64_t n_chunks = (rows + chunk - 1) / chunk;
    auto run = [&](int64_t c) {
      const int64_t r0 = c * chunk, n = std::min(chunk, rows - r0);
      cpu::quantize_rows(GGMLType(type_id), src + r0 * cols, n, cols, qw, dst + size_t(r0) * rb);
    };
    n_threads = int(std::min<int64_t>(n_threads, std::max<int64_t>(1, n_chunks)));
    if (n_threads == 1) {
      for (int64_t c = 0; c < n_chunks; ++c) run(c);
    } else {
      static std::mutex mu;
      static std::unique_ptr<ThreadPool> pool;
      std::lock_guard<std::mutex> lock(mu);
      if (!pool || pool->size() != n_threads) pool = std::make_unique<ThreadPool>(n_threads);
      pool->for_each_dynamic(n_chunks, run);
    }
  }
  return out;
}

}  // namespace

void bind_quantize(py::module_& m) {
  m.def("quantize", &quantize, py::arg("x"), py::arg("type_id"), py::arg("importance") = py::none(),
        py::arg("n_threads") = 0, py::arg("name") = "",
        "Quantize a float array (rows along the last axis) to ggml blocks of type `type_id` (Q8_0, Q4_0, Q4_1,\n"
        "Q5_0, Q5_1, Q2_K..Q6_K), byte-equal to ggml's quantize_<type>. `importance`: per-column weights (an imatrix\n"
        "entry) or None. Returns uint8 of the same shape with the last axis in bytes. `name` goes into\n"
        "error messages.");
  m.def("can_quantize", [](uint32_t type_id) { return cpu::can_quantize(GGMLType(type_id)); });
}

}  // namespace pe
