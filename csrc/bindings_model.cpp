#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include "bindings.h"
#include "model/model.h"

namespace py = pybind11;

namespace pe {

void bind_model(py::module_& m) {
  py::class_<Model, std::shared_ptr<Model>>(m, "Model", "Weights of a GGUF model, mapped from the file.")
      .def(py::init([](const std::string& path) {
             py::gil_scoped_release nogil;
             return std::make_shared<Model>(path);
           }),
           py::arg("path"))
      .def_property_readonly("file", [](const Model& md) { return md.file_; })
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
        d["norm_eps"] = c.norm_eps;
        d["rope_dims"] = c.rope.n_dims;
        d["rope_freq_base"] = c.rope.freq_base;
        d["rope_style"] = c.rope.style == RopeStyle::NeoX ? "neox" : "adjacent";
        return d;
      });

  py::class_<Context>(m, "Context", "An inference context: KV cache, scratch and threads for one sequence.")
      .def(py::init([](std::shared_ptr<Model> model, int64_t n_ctx, int n_threads, int64_t n_batch,
                       const std::string& kv_type) {
             if (kv_type != "f16" && kv_type != "f32") throw py::value_error("kv_type must be 'f16' or 'f32'");
             py::gil_scoped_release nogil;
             return new Context(std::move(model), n_ctx, n_threads, n_batch,
                                kv_type == "f16" ? GGMLType::F16 : GGMLType::F32);
           }),
           py::arg("model"), py::arg("n_ctx"), py::arg("n_threads"), py::arg("n_batch") = 512,
           py::arg("kv_type") = "f16")
      .def(
          "eval",
          [](Context& ctx, py::array_t<int32_t, py::array::c_style | py::array::forcecast> tokens,
             const std::string& logits) -> py::object {
            if (tokens.ndim() != 1) throw py::value_error("tokens must be a 1-D sequence of token ids");
            const int64_t n = tokens.shape(0);
            const int64_t n_vocab = ctx.model().config().n_vocab;
            if (logits != "last" && logits != "all" && logits != "none")
              throw py::value_error("logits must be 'last', 'all' or 'none'");
            py::array_t<float> out;
            if (logits == "all") out = py::array_t<float>({n, n_vocab});
            else if (logits == "last") out = py::array_t<float>({n_vocab});
            float* dst = logits == "none" ? nullptr : out.mutable_data();
            const int32_t* src = tokens.data();
            {
              py::gil_scoped_release nogil;
              ctx.eval(src, n, dst, logits == "all");
            }
            if (logits == "none") return py::none();
            return std::move(out);
          },
          py::arg("tokens"), py::arg("logits") = "last",
          "Evaluate tokens after the current context; returns float32 logits of the last token "
          "([n_vocab]), of all tokens ([n, n_vocab]) or None.")
      .def("truncate", &Context::truncate, py::arg("n"), "Keep only the first n tokens of the context.")
      .def_property_readonly("n_past", &Context::n_past)
      .def_property_readonly("n_ctx", &Context::n_ctx)
      .def_property_readonly("n_threads", &Context::n_threads);
}

}  // namespace pe
