#include "bindings.h"

#include <cstring>

#include "common.h"
#include "cpu/matmul_kernels.h"
#include "cpu_features.h"
#include "threadpool.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyengine's C++ engine";

  // Exception hierarchy (re-exported by pyengine/__init__.py).
  static py::exception<pe::Error> base(m, "EngineError", PyExc_RuntimeError);
  static py::exception<pe::ModelFormatError> fmt(m, "ModelFormatError", PyExc_ValueError);
  static py::exception<pe::UnsupportedModelError> unsup(m, "UnsupportedModelError", PyExc_ValueError);
  static py::exception<pe::ContextLengthError> ctx(m, "ContextLengthError", PyExc_ValueError);
  static py::exception<pe::DeviceMemoryError> devmem(m, "DeviceMemoryError", base.ptr());
  static py::exception<pe::MemoryLimitError> memlimit(m, "MemoryLimitError", base.ptr());
  static py::exception<pe::NumericalError> numerical(m, "NumericalError", base.ptr());
  // Messages can quote names read from a corrupt file: decode them leniently.
  static auto raise = [](const py::object& type, const char* what) {
    py::object msg = py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(what, Py_ssize_t(std::strlen(what)), "replace"));
    PyErr_SetObject(type.ptr(), msg.ptr());
  };
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const pe::ModelFormatError& e) {
      raise(fmt, e.what());
    } catch (const pe::UnsupportedModelError& e) {
      raise(unsup, e.what());
    } catch (const pe::DeviceMemoryError& e) {
      raise(devmem, e.what());
    } catch (const pe::MemoryLimitError& e) {
      raise(memlimit, e.what());
    } catch (const pe::NumericalError& e) {
      raise(numerical, e.what());
    } catch (const pe::ContextLengthError& e) {
      raise(ctx, e.what());
    } catch (const pe::Error& e) {
      raise(base, e.what());
    }
  });

  m.def("cpu_path", [] { return std::string(pe::cpu_path_name(pe::cpu_path())); },
        "Kernel family in use: 'amx', 'avx512', 'avx2' or 'portable'.");
  m.def("best_cpu_path", [] { return std::string(pe::cpu_path_name(pe::best_cpu_path())); },
        "Best kernel family this CPU supports ('amx' included, which runs only when asked for).");
  m.def(
      "set_cpu_path",
      [](const std::string& name) {
        if (name == "portable") pe::set_cpu_path(pe::CpuPath::Portable);
        else if (name == "avx2") pe::set_cpu_path(pe::CpuPath::AVX2);
        else if (name == "avx512") pe::set_cpu_path(pe::CpuPath::AVX512);
        else if (name == "amx") pe::set_cpu_path(pe::CpuPath::AMX);
        else throw py::value_error("cpu path must be 'portable', 'avx2', 'avx512' or 'amx', not '" + name + "'");
      },
      "Force a kernel family (tests and benchmarks).");
  m.def(
      "decode_tuning",
      [] {
        const pe::cpu::DecodeTuning t = pe::cpu::decode_tuning();
        return py::make_tuple(t.two_panels, t.prefetch_bytes, t.spread_bytes, t.rows_prefetch_bytes,
                              t.small_passes_32);
      },
      "How CPU decode walks packed weight panels: (two panels per loop, software prefetch distance in "
      "bytes, spread prefetch distance in bytes, prefetch distance for several rows of 32-element "
      "blocks, passes of the few-row kernels before packing for 32-element blocks, 0 for the ISA's); "
      "chosen by CPU vendor (cpu/matmul_kernels.h).");
  m.def(
      "set_decode_tuning",
      [](bool two_panels, int64_t prefetch_bytes, int64_t spread_bytes, int64_t rows_prefetch_bytes,
         int small_passes_32) {
        pe::cpu::set_decode_tuning({two_panels, prefetch_bytes, spread_bytes, rows_prefetch_bytes, small_passes_32});
      },
      py::arg("two_panels"), py::arg("prefetch_bytes"), py::arg("spread_bytes") = 0,
      py::arg("rows_prefetch_bytes") = 0, py::arg("small_passes_32") = 0,
      "Force the decode tuning (tests and benchmarks).");
  m.def("physical_core_count", &pe::physical_core_count);
#if defined(PE_CUDA)
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif

  pe::bind_kernels(m);
  pe::bind_gguf(m);
  pe::bind_model(m);
  pe::bind_quantize(m);
  pe::bind_quant_search(m);
  pe::bind_cuda_quant(m);
  pe::bind_cuda_attention(m);
  pe::bind_cuda_sampling(m);
}
