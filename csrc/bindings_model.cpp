#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "model/context.h"
#include "model/memory.h"
#include "model/placement.h"
#ifdef PE_CUDA
#include "cuda/runtime.h"
#endif

namespace py = pybind11;

namespace pe {

namespace {

using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

GGMLType kv_type_of(const std::string& name) {
  if (name == "f16") return GGMLType::F16;
  if (name == "f32") return GGMLType::F32;
  if (name == "q8_0") return GGMLType::Q8_0;
  throw py::value_error("kv_type must be 'f16', 'f32' or 'q8_0', not '" + name + "'");
}

const int32_t* vector_data(const IntArray& a, const char* what) {
  if (a.ndim() != 1) throw py::value_error(std::string(what) + " must be a 1-D sequence");
  return a.data();
}

// decode's rows: token i appended to sequence seqs[i], with its logits wanted where `logits` (a bool
// sequence; None: every row) says so.
Batch batch_of(const IntArray& tokens, const IntArray& seqs, const py::object& logits) {
  const int32_t* tp = vector_data(tokens, "tokens");
  const int32_t* sp = vector_data(seqs, "seq_ids");
  const int64_t n = tokens.shape(0);
  if (seqs.shape(0) != n) throw py::value_error("tokens and seq_ids differ in length");
  Batch b;
  b.tokens.assign(tp, tp + n);
  b.seqs.assign(sp, sp + n);
  if (logits.is_none()) {
    b.logits.assign(size_t(n), 1);
  } else {
    auto want = py::array_t<bool, py::array::c_style | py::array::forcecast>(logits);
    if (want.ndim() != 1 || want.shape(0) != n)
      throw py::value_error("logits must be None or a bool sequence as long as tokens");
    b.logits.assign(want.data(), want.data() + n);
  }
  return b;
}

}  // namespace

void bind_model(py::module_& m) {
  py::class_<Model, std::shared_ptr<Model>>(m, "Model", "Weights of a GGUF model, mapped from the file.")
      .def(py::init([](const std::string& path, bool use_mmap) {
             py::gil_scoped_release nogil;
             return std::make_shared<Model>(path, use_mmap);
           }),
           py::arg("path"), py::arg("use_mmap") = true,
           "use_mmap=False reads the weights into private memory instead of mapping the file.")
      .def_property_readonly("file", [](const Model& md) { return md.file_; })
      .def(
          "offload",
          [](Model& md, int n) {
            py::gil_scoped_release nogil;
            md.offload(n);
          },
          py::arg("n_gpu_layers"),
          "Copy the last n_gpu_layers blocks (all of them: also the head) to the GPU, before any context.")
      .def_property_readonly("n_gpu_layers", [](const Model& md) { return md.gpu().n_layers; })
      .def_property_readonly("gpu_bytes", [](const Model& md) { return md.gpu().bytes; })
      .def_property_readonly(
          "gpu_graphs",
          [](const Model& md) {
            const Executor* ex = md.gpu().executor.get();
            py::dict d;
            d["replays"] = ex ? ex->graph_replays() : 0;
            d["kept"] = ex ? ex->graphs_kept() : 0;
            return d;
          },
          "CUDA graphs of decode steps (Executor::run_captured): how many steps replayed one, how many are kept.")
      .def_property_readonly("config", [](const Model& md) {
        const ModelConfig& c = md.config();
        py::dict d;
        d["arch"] = c.arch;
        d["n_vocab"] = c.n_vocab;
        d["n_embd"] = c.n_embd;
        d["n_layer"] = c.n_layer;
        d["n_head"] = c.n_head;
        d["n_head_kv"] = c.n_head_kv;
        d["head_dim"] = c.head_dim;
        d["n_ff"] = c.n_ff;
        d["n_ctx_train"] = c.n_ctx_train;
        d["prefix_length"] = c.prefix_length;
        d["n_expert"] = c.n_expert;
        d["n_expert_used"] = c.n_expert_used;
        d["n_ff_exp"] = c.n_ff_exp;
        d["norm_eps"] = c.norm_eps;
        d["rope_dims"] = c.rope.n_dims;
        d["rope_freq_base"] = c.rope.freq_base;
        d["rope_style"] = c.rope.style == RopeStyle::NeoX ? "neox" : "adjacent";
        d["kq_scale"] = c.kq_scale;
        d["family"] = c.spec.family == Family::EncoderOnly      ? "encoder"
                      : c.spec.family == Family::EncoderDecoder ? "encoder-decoder"
                                                                : "decoder";
        d["n_enc_layer"] = c.n_enc_layer;
        d["decoder_start_token_id"] = c.decoder_start_token;
        d["positions"] = c.spec.positions == Positions::Learned ? "learned" : "rope";
        static const char* const kPooling[] = {"none", "mean", "cls", "last", "rank"};
        d["pooling"] = kPooling[int(c.pooling)];
        return d;
      });

  py::class_<Executor, std::shared_ptr<Executor>>(
      m, "Executor", "Where a model's forward passes run: the CPU thread pool its contexts share.")
      .def(py::init([](int n_threads) {
             if (n_threads < 1 || n_threads > 1024) throw py::value_error("n_threads must be in [1, 1024]");
             return Executor::cpu(n_threads);
           }),
           py::arg("n_threads"))
      .def_property_readonly("n_threads", &Executor::n_threads)
      .def_property_readonly("device", [](const Executor& e) { return std::string(device_name(e.device())); });

  py::class_<Context>(m, "Context",
                      "An inference context: a KV cache holding up to n_seq_max sequences of n_ctx tokens each.")
      .def(py::init([](std::shared_ptr<Model> model, std::shared_ptr<Executor> executor, int64_t n_ctx,
                       int n_seq_max, int64_t n_batch, const std::string& kv_type, size_t max_memory) {
             const GGMLType t = kv_type_of(kv_type);
             py::gil_scoped_release nogil;
             return new Context(std::move(model), std::move(executor), n_ctx, n_seq_max, n_batch, t, max_memory);
           }),
           py::arg("model"), py::arg("executor"), py::arg("n_ctx"), py::arg("n_seq_max") = 1,
           py::arg("n_batch") = 512, py::arg("kv_type") = "f16", py::arg("max_memory") = 0,
           "max_memory: bytes the model and this context may take on the host (0: the machine's memory); "
           "more raises MemoryLimitError before anything is allocated.")
      .def(
          "eval",
          [](Context& ctx, const IntArray& tokens, const std::string& logits, int seq) -> py::object {
            const int32_t* src = vector_data(tokens, "tokens");
            const int64_t n = tokens.shape(0);
            const int64_t n_vocab = ctx.model().config().n_vocab;
            if (logits != "last" && logits != "all" && logits != "none")
              throw py::value_error("logits must be 'last', 'all' or 'none'");
            py::array_t<float> out;
            if (logits == "all") out = py::array_t<float>({n, n_vocab});
            else if (logits == "last") out = py::array_t<float>({n_vocab});
            float* dst = logits == "none" ? nullptr : out.mutable_data();
            {
              py::gil_scoped_release nogil;
              ctx.eval(src, n, dst, logits == "all", seq);
            }
            if (logits == "none") return py::none();
            return std::move(out);
          },
          py::arg("tokens"), py::arg("logits") = "last", py::arg("seq") = 0,
          "Append tokens to sequence `seq`; returns float32 logits of the last token ([n_vocab]), of all "
          "tokens ([n, n_vocab]) or None.")
      .def(
          "decode",
          [](Context& ctx, const IntArray& tokens, const IntArray& seqs, py::object logits, bool embeddings) {
            const Batch b = batch_of(tokens, seqs, logits);
            const ModelConfig& c = ctx.model().config();
            py::array_t<float> out({b.n_logits(), embeddings ? c.n_embd : c.n_vocab});
            float* dst = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              ctx.decode(b, dst, embeddings);
            }
            return out;
          },
          py::arg("tokens"), py::arg("seq_ids"), py::arg("logits") = py::none(), py::arg("embeddings") = false,
          "Evaluate one batch of rows: token i is appended to sequence seq_ids[i]. Returns float32 "
          "[rows with logits wanted, n_vocab] in row order (logits: bool per row; None: every row); with "
          "embeddings=True their final hidden states after the output norm, [rows, n_embd].")
      .def(
          "decode_top",
          [](Context& ctx, const IntArray& tokens, const IntArray& seqs, py::object logits, const IntArray& k,
             const py::array_t<float, py::array::c_style | py::array::forcecast>& inv_t, int k_max,
             const py::object& u) {
            const Batch b = batch_of(tokens, seqs, logits);
            const int64_t m = b.n_logits();
            const int32_t* kp = vector_data(k, "k");
            if (k.shape(0) != m || inv_t.ndim() != 1 || inv_t.shape(0) != m)
              throw py::value_error(str_cat("decode_top: k and inv_t need one entry per wanted row (", m, ")"));
            if (k_max < 1) throw py::value_error("decode_top: k_max must be >= 1");
            py::array_t<double, py::array::c_style | py::array::forcecast> draws;
            if (!u.is_none()) {
              draws = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(u);
              if (!draws || draws.ndim() != 1 || draws.shape(0) != m)
                throw py::value_error(str_cat("decode_top: u needs one float per wanted row (", m, ")"));
            }
            py::array_t<int32_t> ids({m, int64_t(k_max)}), drawn(m);
            py::array_t<float> values({m, int64_t(k_max)}), stats({m, int64_t(2)});
            int32_t* ip = ids.mutable_data();
            int32_t* dp = drawn.mutable_data();
            float* vp = values.mutable_data();
            float* st = stats.mutable_data();
            const float* tv = inv_t.data();
            const double* up = u.is_none() ? nullptr : draws.data();
            std::fill(dp, dp + m, -1);
            int64_t serial;
            {
              py::gil_scoped_release nogil;
              serial = ctx.decode_top(b, kp, tv, k_max, ip, vp, st, up, up ? dp : nullptr);
            }
            return py::make_tuple(ids, values, stats, drawn, serial);
          },
          py::arg("tokens"), py::arg("seq_ids"), py::arg("logits"), py::arg("k"), py::arg("inv_t"),
          py::arg("k_max"), py::arg("u") = py::none(),
          "decode() for sampling (Context::decode_top): for the i-th wanted row, its k[i] largest logits "
          "and their ids (largest first, ties lower id first) and [sum of e^((x - max) * inv_t[i]), "
          "non-finite flag]; with u (float64, one per wanted row), where u[i] is in [0, 1) the token "
          "softmax_draw picks from the whole row at inv_t[i] and u[i] (that row's sum is then 0), elsewhere "
          "(u[i] < 0) -1. Returns (ids int32 [m, k_max], values float32 [m, k_max], stats float32 [m, 2], "
          "drawn int32 [m], serial). row_logits(serial, i) then gives wanted row i's logits.")
      .def(
          "row_logits",
          [](Context& ctx, int64_t serial, int64_t i) {
            py::array_t<float> out(ctx.model().config().n_vocab);
            float* dst = out.mutable_data();
            {
              py::gil_scoped_release nogil;
              ctx.row_logits(serial, i, dst);
            }
            return out;
          },
          py::arg("serial"), py::arg("i"),
          "Wanted row i's float32 logits [n_vocab] from decode_top call `serial`, while they are there.")
      .def(
          "encode",
          [](Context& ctx, const IntArray& tokens, int seq) {
            const int32_t* src = vector_data(tokens, "tokens");
            const int64_t n = tokens.shape(0);
            py::gil_scoped_release nogil;
            ctx.encode(src, n, seq);
          },
          py::arg("tokens"), py::arg("seq") = 0,
          "Encoder-decoder models: run the encoder over `tokens` and keep its output for sequence `seq`'s "
          "cross-attention; the sequence starts over empty (decode from the decoder start token next).")
      .def("seq_encoded_len", &Context::seq_encoded_len, py::arg("seq"))
      .def("seq_len", &Context::seq_len, py::arg("seq"))
      .def("seq_truncate", &Context::seq_truncate, py::arg("seq"), py::arg("n"),
           "Keep only the first n tokens of a sequence.")
      .def("seq_copy", &Context::seq_copy, py::arg("src"), py::arg("dst"),
           "Make sequence dst a copy of src (their cache pages are shared until either appends).")
      .def("clear", &Context::clear, "Empty every sequence.")
      .def("truncate", [](Context& c, int64_t n) { c.seq_truncate(0, n); }, py::arg("n"),
           "Keep only the first n tokens of sequence 0.")
      .def_property_readonly("n_past", [](const Context& c) { return c.seq_len(0); })
      .def_property_readonly("n_ctx", &Context::n_ctx)
      .def_property_readonly("n_seq_max", &Context::n_seq_max)
      .def_property_readonly("n_threads", &Context::n_threads)
      .def_property_readonly("executor", &Context::executor)
      .def_property_readonly("n_gpu_layers", &Context::n_gpu_layers)
      .def_property_readonly("gpu_kv_bytes", &Context::gpu_kv_bytes)
      .def("collect_input_stats", &Context::collect_input_stats, py::arg("on"), py::arg("covariance") = false,
           py::arg("covariance_tensors") = std::vector<std::string>{},
           "Importance matrix: while on, every pass adds each linear layer's input (per column sums of x^2; "
           "with covariance=True also x^T x, for the weights named in covariance_tensors or, when it is empty, "
           "all); turning it on starts from zero. CPU layers only.")
      .def(
          "input_stats",
          [](const Context& ctx) {
            // Weight data -> tensor name, from the model file's tensor table.
            std::unordered_map<const void*, std::string> names;
            for (const auto& t : ctx.model().file().tensors()) names[t.data] = t.name;
            py::dict out;
            for (const auto& [weight, e] : ctx.input_stats().by_weight) {
              auto it = names.find(weight);
              PE_CHECK(it != names.end(), Error, "input statistics: a weight that is not a tensor of the file");
              const auto n_mat = py::ssize_t(e.rows.size()), cols = py::ssize_t(e.sum2.size()) / n_mat;
              py::array_t<double> sums = n_mat == 1 ? py::array_t<double>(cols) : py::array_t<double>({n_mat, cols});
              std::copy(e.sum2.begin(), e.sum2.end(), sums.mutable_data());
              if (n_mat == 1) {
                out[py::str(it->second)] = py::make_tuple(sums, e.rows[0]);
              } else {
                py::array_t<int64_t> rows(n_mat);
                std::copy(e.rows.begin(), e.rows.end(), rows.mutable_data());
                out[py::str(it->second)] = py::make_tuple(sums, rows);
              }
            }
            return out;
          },
          "{tensor name: (float64 [n_cols] sums of x^2 over the rows, rows)} since collect_input_stats(True); for\n"
          "a 3-D tensor of experts, (float64 [n_expert, n_cols], int64 [n_expert] rows routed to each expert).")
      .def(
          "input_covariance",
          [](Context& ctx, bool take) {
            std::unordered_map<const void*, std::string> names;
            for (const auto& t : ctx.model().file().tensors()) names[t.data] = t.name;
            std::unordered_map<const std::vector<float>*, py::array_t<float>> arrays;  // shared inputs: one array
            py::dict out;
            for (const auto& [weight, e] : ctx.input_stats().by_weight) {
              if (!e.xtx) continue;
              auto it = names.find(weight);
              PE_CHECK(it != names.end(), Error, "input statistics: a weight that is not a tensor of the file");
              auto a = arrays.find(e.xtx.get());
              if (a == arrays.end()) {
                const auto n = py::ssize_t(e.sum2.size());
                py::array_t<float> h;
                if (take) {  // the accumulator itself, made symmetric in place; the array keeps it alive
                  float* d = e.xtx->data();
                  for (py::ssize_t i = 1; i < n; i++)
                    for (py::ssize_t j = 0; j < i; j++) d[i * n + j] = d[j * n + i];
                  auto* keep = new std::shared_ptr<std::vector<float>>(e.xtx);
                  py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<std::vector<float>>*>(p); });
                  h = py::array_t<float>({n, n}, d, owner);
                } else {
                  h = py::array_t<float>({n, n});
                  float* d = h.mutable_data();
                  const float* src = e.xtx->data();
                  for (py::ssize_t i = 0; i < n; i++)  // symmetric from the accumulated upper triangle
                    for (py::ssize_t j = 0; j < n; j++) d[i * n + j] = i <= j ? src[i * n + j] : src[j * n + i];
                }
                a = arrays.emplace(e.xtx.get(), h).first;
              }
              out[py::str(it->second)] = py::make_tuple(a->second, e.rows[0]);
            }
            if (take) ctx.collect_input_stats(false);  // the context lets go of the matrices (and the sums)
            return out;
          },
          py::arg("take") = false,
          "{tensor name: (float32 [n_cols, n_cols] x^T x over the rows, rows)} since collect_input_stats(True, "
          "covariance=True); layers that read the same input share one array. take=True hands the engine's own\n"
          "matrices over instead of copying them (half the memory) and stops the collection: read input_stats()\n"
          "first.");

  m.def(
      "host_memory_plan",
      [](const Model& model, int64_t n_ctx, int n_seq_max, int64_t n_batch, const std::string& kv_type) {
        const HostMemoryPlan p =
            host_memory_plan(model, n_ctx, n_seq_max, n_batch, kv_type_of(kv_type), model.gpu().n_layers);
        py::dict d;
        d["weights"] = p.weights;
        d["kv_cache"] = p.kv_cache;
        d["scratch"] = p.scratch;
        d["logits"] = p.logits;
        d["total"] = p.total();
        d["limit"] = host_memory_limit();
        return d;
      },
      py::arg("model"), py::arg("n_ctx"), py::arg("n_seq_max") = 1, py::arg("n_batch") = 512,
      py::arg("kv_type") = "f16", "Host memory (bytes) a context with these settings needs, and the machine's limit.");
  m.def("cuda_device_count", &cuda_device_count, "CUDA devices this build can use (0 without CUDA).");
  m.def(
      "cuda_memory",
      []() -> py::object {
#ifdef PE_CUDA
        if (cuda_device_count() > 0) {
          size_t free_b = 0, total_b = 0;
          cuda::memory_info(&free_b, &total_b);
          return py::make_tuple(free_b, total_b, std::string(cuda::device_description()));
        }
#endif
        return py::none();
      },
      "(free bytes, total bytes, description) of the GPU, or None without one.");
  m.def(
      "plan_offload",
      [](const Model& model, int n_gpu_layers, int64_t n_ctx, int n_seq_max, int64_t n_batch,
         const std::string& kv_type, size_t free_bytes) {
        OffloadRequest req{n_gpu_layers, n_ctx, n_seq_max, n_batch, kv_type_of(kv_type)};
        const OffloadPlan p = plan_offload(model, req, free_bytes);
        py::dict d;
        d["n_gpu_layers"] = p.n_gpu_layers;
        d["head"] = p.head;
        d["weights"] = p.weights;
        d["kv_cache"] = p.kv_cache;
        d["scratch"] = p.scratch;
        d["total"] = p.total();
        d["margin"] = kOffloadMargin;
        return d;
      },
      py::arg("model"), py::arg("n_gpu_layers"), py::arg("n_ctx"), py::arg("n_seq_max"), py::arg("n_batch"),
      py::arg("kv_type"), py::arg("free_bytes"),
      "The GPU memory plan for offloading n_gpu_layers blocks (-1: as many as fit in free_bytes). Raises "
      "DeviceMemoryError when an explicit count does not fit.");
}

}  // namespace pe
