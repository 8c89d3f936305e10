// Quantizers on numpy arrays: the converter's and `pyengine quantize`'s back end.
#include <pybind11/numpy.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.h"
#include "bindings_quantize.h"
#include "common.h"
#include "cpu/quant_blocks.h"
#include "cpu/quantize.h"
#include "threadpool.h"

namespace py = pybind11;

namespace pe {

namespace {


// Runs `run(chunk)` over n_chunks chunks of rows on n_threads threads (the pool is shared between calls).
template <typename F>
void run_chunks(int64_t n_chunks, int n_threads, F&& run) {
  n_threads = int(std::min<int64_t>(n_threads, std::max<int64_t>(1, n_chunks)));
  if (n_threads == 1) {
    for (int64_t c = 0; c < n_chunks; ++c) run(c);
    return;
  }
  static std::mutex mu;
  static std::unique_ptr<ThreadPool> pool;
  std::lock_guard<std::mutex> lock(mu);
  if (!pool || pool->size() != n_threads) pool = std::make_unique<ThreadPool>(n_threads);
  pool->for_each_dynamic(n_chunks, run);
}

// Rows per chunk: rows of uneven cost (all-zero rows are quick), so threads take small chunks of rows as
// they finish; about 16K values a chunk, as llama-quantize's chunks.
int64_t rows_per_chunk(int64_t rows, int64_t cols, int n_threads) {
  const int64_t by_size = std::max<int64_t>(1, (int64_t(16) << 10) / cols);
  const int64_t by_balance = std::max<int64_t>(1, rows / (8 * int64_t(n_threads)));
  return std::min(by_size, by_balance);
}

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
  const float* qw = importance_vector(importance, cols, what, imp);
  const size_t rb = row_bytes(GGMLType(type_id), cols);
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
  shape.back() = py::ssize_t(rb);
  py::array_t<uint8_t> out(shape);
  const float* src = x.data();
  uint8_t* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    if (n_threads <= 0) n_threads = physical_core_count();
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(16, rows / (8 * int64_t(n_threads)) + 1));
    run_chunks((rows + chunk - 1) / chunk, n_threads, [&](int64_t c) {
      const int64_t r0 = c * chunk, n = std::min(chunk, rows - r0);
      cpu::quantize_rows(GGMLType(type_id), src + r0 * cols, n, cols, qw, dst + size_t(r0) * rb);
    });
  }
  return out;
}

// Rows of raw GGUF data (any type the engine dequantizes) straight to ggml blocks: each thread converts
// its chunk of rows to float32 in its own small buffer and quantizes it, so a tensor never exists as a
// whole in float32 (memory) and the conversion runs on every thread (time), as llama-quantize's does.
size_t quantize_raw(const py::buffer& src, uint32_t src_type, int64_t rows, int64_t cols, uint32_t type_id,
                    const py::buffer& out, const py::object& importance, int64_t rows_per_expert, int64_t first_row,
                    int n_threads, const std::string& name) {
  const std::string what = name.empty() ? std::string("tensor") : "tensor " + name;
  const TypeTraits* tr = type_traits(type_id);
  const TypeTraits* st = type_traits(src_type);
  PE_CHECK(tr && cpu::can_quantize(GGMLType(type_id)), UnsupportedModelError, what, ": cannot quantize to type ",
           tr ? tr->name : std::to_string(type_id).c_str());
  PE_CHECK(st != nullptr, UnsupportedModelError, what, ": unknown source type ", src_type);
  PE_CHECK(rows >= 0 && cols > 0 && cols % tr->block_size == 0 && cols % st->block_size == 0, ModelFormatError, what,
           ": rows of ", cols, " elements are not a multiple of the ", tr->name, " block size ", tr->block_size);
  const size_t src_rb = row_bytes(GGMLType(src_type), cols), rb = row_bytes(GGMLType(type_id), cols);
  const py::buffer_info si = src.request(), oi = out.request(true);
  PE_CHECK(size_t(si.size * si.itemsize) >= size_t(rows) * src_rb, ModelFormatError, what, ": ",
           si.size * si.itemsize, " bytes of data for ", rows, " rows of ", src_rb, " bytes (", st->name, ")");
  PE_CHECK(size_t(oi.size * oi.itemsize) >= size_t(rows) * rb, Error, what, ": output buffer of ",
           oi.size * oi.itemsize, " bytes for ", size_t(rows) * rb);
  // importance: none, one vector shared by every row, or one per expert (n_expert, cols) with
  // rows_per_expert rows each; first_row is the global index of src's first row
  F32Array imp;
  const float* qw = nullptr;
  int64_t n_imp = 0;
  if (!importance.is_none()) {
    imp = F32Array::ensure(importance);
    PE_CHECK(imp && imp.ndim() >= 1 && imp.ndim() <= 2 && imp.shape(imp.ndim() - 1) == cols, ModelFormatError, what,
             ": importance of ", imp ? int64_t(imp.size()) : int64_t(-1), " values for ", cols, " columns");
    n_imp = imp.ndim() == 2 ? imp.shape(0) : 1;
    qw = imp.data();
  }
  if (n_imp > 1) {
    PE_CHECK(rows_per_expert > 0 && (first_row + rows + rows_per_expert - 1) / rows_per_expert <= n_imp,
             ModelFormatError, what, ": importance for ", n_imp, " experts, rows ", first_row, "..",
             first_row + rows, " of ", rows_per_expert, " per expert");
  }
  const auto* s = static_cast<const uint8_t*>(si.ptr);
  auto* d = static_cast<uint8_t*>(oi.ptr);
  const GGMLType from = GGMLType(src_type), to = GGMLType(type_id);
  {
    py::gil_scoped_release release;
    if (n_threads <= 0) n_threads = physical_core_count();
    const int64_t chunk = rows_per_chunk(rows, cols, n_threads);
    run_chunks((rows + chunk - 1) / chunk, n_threads, [&](int64_t c) {
      const int64_t r0 = c * chunk, n = std::min(chunk, rows - r0);
      thread_local std::vector<float> buf;
      const float* x;
      if (from == GGMLType::F32) {
        x = reinterpret_cast<const float*>(s + size_t(r0) * src_rb);
      } else {
        if (buf.size() < size_t(n * cols)) buf.resize(size_t(n * cols));
        for (int64_t r = 0; r < n; ++r)
          cpu::dequantize_row_ref(from, s + size_t(r0 + r) * src_rb, cols, buf.data() + r * cols);
        x = buf.data();
      }
      // a chunk may straddle two experts: each run of rows gets its expert's importance
      for (int64_t r = 0; r < n;) {
        const int64_t g = first_row + r0 + r;
        const int64_t run = n_imp > 1 ? std::min(n - r, rows_per_expert - g % rows_per_expert) : n - r;
        const float* w = n_imp > 1 ? qw + (g / rows_per_expert) * cols : qw;
        cpu::quantize_rows(to, x + r * cols, run, cols, w, d + size_t(r0 + r) * rb);
        r += run;
      }
    });
  }
  return size_t(rows) * rb;
}

}  // namespace

const float* importance_vector(const py::object& importance, int64_t cols, const std::string& what, F32Array& keep) {
  if (importance.is_none()) return nullptr;
  keep = F32Array::ensure(importance);
  PE_CHECK(keep && keep.ndim() == 1 && keep.shape(0) == cols, ModelFormatError, what, ": importance has ",
           keep ? int64_t(keep.size()) : int64_t(-1), " values for ", cols, " columns");
  return keep.data();
}

void bind_quantize(py::module_& m) {
  m.def("quantize", &quantize, py::arg("x"), py::arg("type_id"), py::arg("importance") = py::none(),
        py::arg("n_threads") = 0, py::arg("name") = "",
        "Quantize a float array (rows along the last axis) to ggml blocks of type `type_id` (Q8_0, Q4_0, Q4_1,\n"
        "Q5_0, Q5_1, Q2_K..Q6_K), byte-equal to ggml's quantize_<type>. `importance`: per-column weights (an imatrix\n"
        "entry) or None. Returns uint8 of the same shape with the last axis in bytes. `name` goes into\n"
        "error messages.");
  m.def("quantize_raw", &quantize_raw, py::arg("src"), py::arg("src_type"), py::arg("rows"), py::arg("cols"),
        py::arg("type_id"), py::arg("out"), py::arg("importance") = py::none(), py::arg("rows_per_expert") = 0,
        py::arg("first_row") = 0, py::arg("n_threads") = 0, py::arg("name") = "",
        "Quantize `rows` rows of `cols` values of raw GGUF data `src` (type `src_type`: F32, F16, BF16 or any\n"
        "type the engine dequantizes) into `out` (a writable buffer), as quantize() would after dequantizing,\n"
        "without a float32 copy of the whole. `importance`: None, (cols,) for every row, or (n_expert, cols)\n"
        "with `rows_per_expert` rows per expert, src's first row being row `first_row` of the tensor.\n"
        "Returns the bytes written.");
  m.def("can_quantize", [](uint32_t type_id) { return cpu::can_quantize(GGMLType(type_id)); });
}

}  // namespace pe
