// Kernel entry points on numpy arrays, for tests and benchmarks.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.h"
#include "common.h"
#include "ops/activation.h"
#include "ops/elementwise.h"
#include "cpu/attention_kernels.h"
#include "cpu/panels.h"
#include "cpu/sampling.h"
#include "ops/matmul.h"
#include "ops/moe.h"
#include "ops/top_logits.h"
#ifdef PE_CUDA
#include "cuda/ops.h"
#endif

namespace py = pybind11;

namespace pe {

namespace {

// One persistent executor per thread count: creating threads per call would dominate small benchmarks.
Executor& executor_for(int n_threads) {
  static std::mutex mu;
  static std::map<int, std::shared_ptr<Executor>> executors;
  std::lock_guard<std::mutex> lock(mu);
  auto& e = executors[n_threads];
  if (!e) e = Executor::cpu(n_threads);
  return *e;
}

Executor& cuda_executor() {
  static std::mutex mu;
  static std::shared_ptr<Executor> ex;
  std::lock_guard<std::mutex> lock(mu);
  if (!ex) ex = Executor::cuda();
  return *ex;
}

// A tensor's bytes copied to `device` (the same view on the CPU: no copy). `keep` owns the copy.
Tensor on_device(Executor& ex, const Tensor& t, std::vector<Buffer>& keep) {
  if (ex.device() == Device::CPU) return t;
  keep.emplace_back(ex.device(), t.row_stride * size_t(t.rows));
  copy_between(ex, ex.device(), keep.back().data(), Device::CPU, t.data, t.row_stride * size_t(t.rows));
  Tensor d = t;
  d.data = keep.back().data();
  d.device = ex.device();
  return d;
}

Executor& executor_on(const std::string& device, int n_threads) {
  if (device == "cpu") return executor_for(n_threads);
  if (device == "cuda") return cuda_executor();
  throw py::value_error("device must be 'cpu' or 'cuda', not '" + device + "'");
}

// Runs op(ex, inputs on the device..., output on the device) and copies the output back to `out`.
template <typename Op>
void run_on(Executor& ex, const std::vector<Tensor>& inputs, const Tensor& out, Op op) {
  auto lock = ex.lock();
  std::vector<Buffer> keep;
  std::vector<Tensor> dev;
  for (const Tensor& t : inputs) dev.push_back(on_device(ex, t, keep));
  const Tensor dout = on_device(ex, out, keep);
  op(ex, dev, dout);
  if (ex.device() != Device::CPU)
    copy_between(ex, Device::CPU, out.data, ex.device(), dout.data, out.row_stride * size_t(out.rows));
}

// Validates raw GGUF bytes of a rows x cols matrix and returns a view of them.
Tensor weight_view(const py::buffer_info& info, uint32_t type_id, int64_t rows, int64_t cols) {
  if (info.itemsize != 1) throw py::value_error("weights must be raw bytes (a uint8 array or bytes)");
  if (rows < 0 || cols <= 0) throw py::value_error(str_cat("bad weight shape ", rows, " x ", cols));
  PE_CHECK(type_traits(type_id), UnsupportedModelError, "unknown tensor type id ", type_id);
  const GGMLType t = GGMLType(type_id);
  PE_CHECK(matmul_supports(t), UnsupportedModelError, "type ", type_name(type_id), " is not supported by matmul");
  const size_t rb = row_bytes(t, cols);
  ssize_t expected_stride = 1;
  for (ssize_t i = info.ndim - 1; i >= 0; i--) {
    if (info.shape[i] != 1 && info.strides[i] != expected_stride)
      throw py::value_error("weight bytes must be C-contiguous");
    expected_stride *= info.shape[i];
  }
  if (size_t(info.size) != rb * size_t(rows))
    throw py::value_error(str_cat("weights of type ", type_name(type_id), " ", rows, " x ", cols, " take ",
                                  rb * size_t(rows), " bytes, got ", info.size));
  return Tensor{t, info.ptr, rows, cols, rb};
}

// w with a copy in the panel layout of the current CPU path (cpu/panels.h), as a model's CPU weights
// get (in huge pages where the OS gives them, as Model::pack_cpu_weights does), when `panels` asks for
// it and the path and type have one.
Tensor maybe_with_panels(Executor& ex, Tensor w, bool panels, std::vector<Buffer>& keep) {
  if (!panels || ex.device() != Device::CPU || !cpu::can_pack_panels(w)) return w;
  const int r = cpu::panel_rows_for_cpu(w);
  if (r == 0) return w;
  keep.push_back(Buffer::huge_pages(cpu::panel_bytes(w, r)));
  cpu::pack_panels(ex, w, r, keep.back().data());
  w.panels = keep.back().data();
  w.panel_rows = r;
  return w;
}

// The thread count a kernel binding accepts.
void check_threads(int n_threads) {
  if (n_threads < 1 || n_threads > 256) throw py::value_error("n_threads must be in [1, 256]");
}

// x of a product with `cols`-column weights: float32 (m, cols).
void check_x(const py::array_t<float, py::array::c_style | py::array::forcecast>& x, int64_t cols) {
  if (x.ndim() != 2 || x.shape(1) != cols) throw py::value_error(str_cat("x must have shape (m, ", cols, ")"));
}

MatmulRounding rounding_named(const std::string& name) {
  if (name == "int8") return MatmulRounding::Int8;
  if (name == "bf16") return MatmulRounding::Bf16;
  throw py::value_error(str_cat("rounding must be 'int8' or 'bf16', not '", name, "'"));
}

py::array_t<float> py_matmul(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols,
                             const py::array_t<float, py::array::c_style | py::array::forcecast>& x, int n_threads,
                             const std::string& device, bool panels, const std::string& rounding_name) {
  const MatmulRounding rounding = rounding_named(rounding_name);
  const py::buffer_info wi = w.request();
  const Tensor view = weight_view(wi, type_id, rows, cols);
  check_x(x, cols);
  check_threads(n_threads);
  const int64_t m = x.shape(0);
  py::array_t<float> y({m, rows});
  const float* xp = x.data();
  float* yp = y.mutable_data();
  {
    py::gil_scoped_release release;
    Executor& ex = executor_on(device, n_threads);
    run_on(ex, {view, f32_tensor(const_cast<float*>(xp), m, cols, cols)}, f32_tensor(yp, m, rows, rows),
           [&](Executor& e, const std::vector<Tensor>& in, const Tensor& y) {
             std::vector<Buffer> keep;
             matmul(e, maybe_with_panels(e, in[0], panels, keep), in[1], y, rounding);
           });
  }
  return y;
}

// Seconds per product of matmul on the CPU with W repacked once in the panel layout a loaded model's
// weights get (or as stored, panels=false): the mean over `repeat` products after one untimed, with the
// repacking outside the clock (benchmarks/bench_kernels.py).
double py_time_matmul(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols,
                      const py::array_t<float, py::array::c_style | py::array::forcecast>& x, int n_threads,
                      bool panels, int repeat) {
  const py::buffer_info wi = w.request();
  const Tensor view = weight_view(wi, type_id, rows, cols);
  check_x(x, cols);
  check_threads(n_threads);
  if (repeat < 1) throw py::value_error("repeat must be >= 1");
  std::vector<float> y(size_t(x.shape(0)) * size_t(rows));
  const float* xp = x.data();
  double seconds = 0;
  {
    py::gil_scoped_release release;
    Executor& ex = executor_for(n_threads);
    auto lock = ex.lock();
    std::vector<Buffer> keep;
    const Tensor wp = maybe_with_panels(ex, view, panels, keep);
    const Tensor xt = f32_tensor(const_cast<float*>(xp), x.shape(0), cols, cols);
    const Tensor yt = f32_tensor(y.data(), x.shape(0), rows, rows);
    matmul(ex, wp, xt, yt, MatmulRounding::Int8);
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < repeat; i++) matmul(ex, wp, xt, yt, MatmulRounding::Int8);
    seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / repeat;
  }
  return seconds;
}

// The weights of one type that read the same x, their outputs side by side in one (m, sum(rows)) array
// (as the forward pass's q|k|v buffer): matmul's group form on the CPU.
py::array_t<float> py_matmul_group(const std::vector<py::buffer>& ws, uint32_t type_id, const std::vector<int64_t>& rows,
                                   int64_t cols, const py::array_t<float, py::array::c_style | py::array::forcecast>& x,
                                   int n_threads, bool panels, const std::string& rounding_name) {
  const MatmulRounding rounding = rounding_named(rounding_name);
  if (ws.size() != rows.size()) throw py::value_error("one row count per weight");
  std::vector<py::buffer_info> infos;
  std::vector<Tensor> views;
  int64_t total = 0;
  for (size_t i = 0; i < ws.size(); i++) {
    infos.push_back(ws[i].request());
    views.push_back(weight_view(infos.back(), type_id, rows[i], cols));
    total += rows[i];
  }
  check_x(x, cols);
  check_threads(n_threads);
  const int64_t m = x.shape(0);
  py::array_t<float> y({m, total});
  const Tensor X = f32_tensor(const_cast<float*>(x.data()), m, cols, cols), Y = f32_tensor(y.mutable_data(), m, total, total);
  {
    py::gil_scoped_release release;
    Executor& ex = executor_on("cpu", n_threads);
    auto lock = ex.lock();
    std::vector<Buffer> keep;
    std::vector<Tensor> w, out;
    int64_t c0 = 0;
    for (size_t i = 0; i < views.size(); i++) {
      w.push_back(maybe_with_panels(ex, views[i], panels, keep));
      out.push_back(Y.cols_view(c0, rows[i]));
      c0 += rows[i];
    }
    matmul(ex, w, X, out, rounding);
  }
  return y;
}

py::array_t<float> py_dequantize(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols,
                                 const std::string& device) {
  const py::buffer_info wi = w.request();
  const Tensor view = weight_view(wi, type_id, rows, cols);
  py::array_t<float> out({rows, cols});
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    std::vector<int32_t> ids(static_cast<size_t>(rows));
    for (int64_t r = 0; r < rows; r++) ids[size_t(r)] = int32_t(r);
    Executor& ex = executor_on(device, 1);
    run_on(ex, {view, Tensor{GGMLType::I32, ids.data(), 1, rows, size_t(rows) * 4}}, f32_tensor(op, rows, cols, cols),
           [](Executor& e, const std::vector<Tensor>& in, const Tensor& y) { get_rows(e, in[0], in[1], y); });
  }
  return out;
}

py::array_t<float> py_moe_ffn(const py::array_t<float, py::array::c_style | py::array::forcecast>& router,
                              const py::buffer& gate, const py::buffer& up, const py::buffer& down, uint32_t type_id,
                              int64_t n_ff, int64_t n_used, bool norm_weights,
                              const py::array_t<float, py::array::c_style | py::array::forcecast>& x, int n_threads,
                              const std::string& device, bool panels) {
  if (router.ndim() != 2 || x.ndim() != 2 || x.shape(1) != router.shape(1))
    throw py::value_error("router must be (n_expert, d) and x (n, d)");
  check_threads(n_threads);
  const int64_t n_expert = router.shape(0), d = router.shape(1), n = x.shape(0);
  const py::buffer_info gi = gate.request(), ui = up.request(), di = down.request();
  const Tensor g = weight_view(gi, type_id, n_expert * n_ff, d), u = weight_view(ui, type_id, n_expert * n_ff, d);
  const Tensor dn = weight_view(di, type_id, n_expert * d, n_ff);
  const Tensor r = f32_tensor(const_cast<float*>(router.data()), n_expert, d, d);
  py::array_t<float> out({n, d});
  float* op = out.mutable_data();
  {
    py::gil_scoped_release release;
    Executor& ex = executor_on(device, n_threads);
    MoEParams p;
    p.n_expert = n_expert;
    p.n_used = n_used;
    p.n_ff = n_ff;
    p.norm_weights = norm_weights;
    run_on(ex, {r, g, u, dn, f32_tensor(const_cast<float*>(x.data()), n, d, d)}, f32_tensor(op, n, d, d),
           [&](Executor& e, const std::vector<Tensor>& in, const Tensor& y) {
             MoEScratch scratch;
             std::vector<Buffer> keep;
             const Experts experts{in[0], maybe_with_panels(e, in[1], panels, keep),
                                   maybe_with_panels(e, in[2], panels, keep), maybe_with_panels(e, in[3], panels, keep)};
             moe_ffn(e, experts, p, in[4], y, scratch, "moe");
           });
  }
  return out;
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.def(
      "attention_softmax",
      [](py::array_t<float, py::array::c_style | py::array::forcecast> x, float scale) {
        PE_CHECK(x.ndim() == 2 && x.shape(1) > 0, Error, "attention_softmax: x must be 2-D with at least one column");
        py::array_t<float> out({x.shape(0), x.shape(1)});
        std::copy(x.data(), x.data() + x.size(), out.mutable_data());
        for (int64_t r = 0; r < x.shape(0); r++) cpu::attention_softmax(out.mutable_data(r), x.shape(1), scale);
        return out;
      },
      py::arg("x"), py::arg("scale") = 1.0f,
      "softmax(scale * row) of each row of float32 x, by attention's softmax kernel on the current CPU path.");
  m.def(
      "activation",
      [](const py::array_t<float, py::array::c_style | py::array::forcecast>& x, const std::string& act,
         const py::object& up_obj, int n_threads) {
        using F32 = py::array_t<float, py::array::c_style | py::array::forcecast>;
        const bool gated = !up_obj.is_none();
        const F32 upa = gated ? F32::ensure(up_obj) : F32();
        if (gated && !upa) throw py::value_error("up must be a float32 array");
        const F32* up = gated ? &upa : nullptr;
        static const std::map<std::string, Activation> kinds = {{"silu", Activation::SiLU}, {"gelu", Activation::GELU},
                                                                {"gelu_erf", Activation::GELUErf},
                                                                {"relu", Activation::ReLU}};
        const auto kind = kinds.find(act);
        if (kind == kinds.end()) throw py::value_error("act must be silu, gelu, gelu_erf or relu, not '" + act + "'");
        if (x.ndim() != 2 || (up && (up->ndim() != 2 || up->shape(0) != x.shape(0) || up->shape(1) != x.shape(1))))
          throw py::value_error("x (and up) must be float32 arrays of one (rows, cols) shape");
        check_threads(n_threads);
        const int64_t n = x.shape(0), d = x.shape(1);
        py::array_t<float> out({n, d});
        std::memcpy(out.mutable_data(), x.data(), sizeof(float) * size_t(n * d));
        const Tensor o = f32_tensor(out.mutable_data(), n, d, d);
        const Tensor u = up ? f32_tensor(const_cast<float*>(up->data()), n, d, d) : o;
        py::gil_scoped_release release;
        if (up) gated_activation(executor_for(n_threads), kind->second, o, u, o);
        else activation(executor_for(n_threads), kind->second, o);
        return out;
      },
      py::arg("x"), py::arg("act") = "silu", py::arg("up") = py::none(), py::arg("n_threads") = 1,
      "The activation ops (ops/activation.h) on the CPU: act(x) * up when up is given (gated_activation), else\n"
      "act(x); float32 (rows, cols). act: silu, gelu (tanh form), gelu_erf, relu.");
  m.def("moe_ffn", &py_moe_ffn, py::arg("router"), py::arg("gate"), py::arg("up"), py::arg("down"),
        py::arg("type_id"), py::arg("n_ff"), py::arg("n_used"), py::arg("norm_weights"), py::arg("x"),
        py::arg("n_threads") = 1, py::arg("device") = "cpu", py::arg("panels") = false,
        "The mixture-of-experts op (ops/moe.h) on numpy arrays: router float32 (n_expert, d); gate/up raw GGUF "
        "bytes of n_expert stacked (n_ff, d) matrices of type `type_id`, down of (d, n_ff) ones; x float32 (n, d). "
        "Returns float32 (n, d). panels: the experts in the CPU kernels' panel layout, as a model's.");
  m.def(
      "softmax_draw",
      [](const py::array_t<float, py::array::c_style | py::array::forcecast>& x, double inv_t, double u) {
        if (x.ndim() != 1 || x.size() == 0) throw py::value_error("softmax_draw: logits must be a non-empty 1-D array");
        if (!(inv_t > 0) || !std::isfinite(float(inv_t)))
          throw py::value_error(str_cat("softmax_draw: inverse temperature must be positive and finite, got ", inv_t));
        if (!(u >= 0 && u < 1)) throw py::value_error(str_cat("softmax_draw: u must be in [0, 1), got ", u));
        // The GIL stays held: tens of microseconds, and a thread that gives it up may wait for it
        // until the interpreter's switch interval (5 ms) when the server's event loop holds it.
        const int64_t i = cpu::softmax_draw(x.data(), x.size(), float(inv_t), u);
        if (i < 0) throw py::value_error("softmax_draw: the logits hold a NaN or have no finite maximum");
        return i;
      },
      py::arg("x"), py::arg("inv_t"), py::arg("u"),
      "Index drawn from softmax(x * inv_t) at u in [0, 1) by inverse CDF in index order (cpu/sampling.h): "
      "the last step of pyengine.sampling.Sampler. Tokens at -inf are never drawn.");
  m.attr("top_logits_max") = kTopLogitsMax;
  m.def(
      "top_logits",
      [](const py::array_t<float, py::array::c_style | py::array::forcecast>& logits,
         const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& k,
         const py::array_t<float, py::array::c_style | py::array::forcecast>& inv_t, int k_max,
         const std::string& device) {
        if (logits.ndim() != 2 || logits.shape(1) == 0) throw py::value_error("top_logits: logits must be (n, V), V > 0");
        const int64_t n = logits.shape(0), v = logits.shape(1);
        if (k.ndim() != 1 || k.shape(0) != n || inv_t.ndim() != 1 || inv_t.shape(0) != n)
          throw py::value_error("top_logits: k and inv_t need one entry per row");
        if (k_max < 1 || k_max > kTopLogitsMax)
          throw py::value_error(str_cat("top_logits: k_max must be in [1, ", kTopLogitsMax, "]"));
        for (int64_t r = 0; r < n; r++) {
          if (k.data()[r] < 1 || k.data()[r] > std::min<int64_t>(v, k_max))
            throw py::value_error(str_cat("top_logits: k[", r, "] = ", k.data()[r], " is not in [1, min(V, k_max)]"));
          if (!(inv_t.data()[r] >= 0) || !std::isfinite(inv_t.data()[r]))
            throw py::value_error(str_cat("top_logits: inv_t[", r, "] must be finite and >= 0"));
        }
        py::array_t<int32_t> ids({n, int64_t(k_max)});
        py::array_t<float> values({n, int64_t(k_max)}), stats({n, int64_t(2)});
        std::fill(ids.mutable_data(), ids.mutable_data() + n * k_max, -1);
        std::fill(values.mutable_data(), values.mutable_data() + n * k_max, 0.f);
        Executor& ex = executor_on(device, 1);
        auto lock = ex.lock();
        std::vector<Buffer> keep;
        auto f32 = [](const float* p, int64_t rows, int64_t cols) {
          return Tensor{GGMLType::F32, const_cast<float*>(p), rows, cols, size_t(cols) * sizeof(float)};
        };
        const Tensor tl = on_device(ex, f32(logits.data(), n, v), keep);
        const Tensor tk = on_device(ex, Tensor{GGMLType::I32, const_cast<int32_t*>(k.data()), 1, n, size_t(n) * 4}, keep);
        const Tensor tt = on_device(ex, f32(inv_t.data(), 1, n), keep);
        const Tensor host_ids{GGMLType::I32, ids.mutable_data(), n, k_max, size_t(k_max) * 4};
        const Tensor host_values = f32(values.data(), n, k_max), host_stats = f32(stats.data(), n, 2);
        const Tensor ti = on_device(ex, host_ids, keep), tv = on_device(ex, host_values, keep),
                     ts = on_device(ex, host_stats, keep);
        top_logits(ex, tl, tk, tt, ti, tv, ts);
        if (ex.device() != Device::CPU)
          for (auto [dst, src] : {std::pair{host_ids, ti}, std::pair{host_values, tv}, std::pair{host_stats, ts}})
            copy_between(ex, Device::CPU, dst.data, ex.device(), src.data, dst.row_stride * size_t(dst.rows));
        return py::make_tuple(ids, values, stats);
      },
      py::arg("logits"), py::arg("k"), py::arg("inv_t"), py::arg("k_max"), py::arg("device") = "cpu",
      "ops/top_logits.h on float32 (n, V) logits: (ids int32 (n, k_max), values float32 (n, k_max), stats "
      "float32 (n, 2)); row r's k[r] largest first (entries past k[r]: -1 and 0), stats [weight sum at "
      "inv_t[r], non-finite flag]. device 'cuda' runs the GPU kernel (inputs copied there and back).");
  m.def("matmul", &py_matmul, py::arg("w"), py::arg("type_id"), py::arg("rows"), py::arg("cols"), py::arg("x"),
        py::arg("n_threads") = 1, py::arg("device") = "cpu", py::arg("panels") = false, py::arg("rounding") = "int8",
        "Y = X @ W.T with W given as raw GGUF bytes of a rows x cols matrix of ggml type `type_id`, "
        "X float32 (m, cols). Returns float32 (m, rows). Runs on the current CPU path, or with "
        "device='cuda' on the GPU (inputs copied there and back). panels: W repacked first into the CPU kernels' "
        "panel layout (cpu/panels.h), as a loaded model's CPU weights are. rounding: 'int8' or 'bf16' "
        "(ops/matmul.h's MatmulRounding: an encoder pass's).");
  m.def("time_matmul", &py_time_matmul, py::arg("w"), py::arg("type_id"), py::arg("rows"), py::arg("cols"),
        py::arg("x"), py::arg("n_threads") = 1, py::arg("panels") = true, py::arg("repeat") = 10,
        "Seconds per CPU product X @ W.T (arguments as matmul's), W repacked once into the panel layout as a "
        "loaded model's weights are (panels=True) or as stored: the mean of `repeat` products after a warm-up, "
        "the repacking untimed.");
  m.def("matmul_group", &py_matmul_group, py::arg("ws"), py::arg("type_id"), py::arg("rows"), py::arg("cols"),
        py::arg("x"), py::arg("n_threads") = 1, py::arg("panels") = false, py::arg("rounding") = "int8",
        "matmul's group form on the CPU: X @ W_i.T for weights of one type that read the same X (raw GGUF bytes, "
        "rows[i] x cols each), returned side by side as float32 (m, sum(rows)).");
  m.def("dequantize", &py_dequantize, py::arg("w"), py::arg("type_id"), py::arg("rows"), py::arg("cols"),
        py::arg("device") = "cpu",
        "Raw GGUF bytes of a rows x cols matrix of ggml type `type_id` as float32 (rows, cols).");
}

}  // namespace pe
