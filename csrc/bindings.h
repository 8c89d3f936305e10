// pyengine._C is assembled from one bind_* function per area, each in its own bindings_*.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace pe {
void bind_kernels(pybind11::module_& m);  // bindings_kernels.cpp: ops on numpy arrays, for tests
void bind_gguf(pybind11::module_& m);     // bindings_gguf.cpp: GGUF reader
void bind_model(pybind11::module_& m);    // bindings_model.cpp: Model / Context
void bind_quantize(pybind11::module_& m);  // bindings_quantize.cpp: float rows -> ggml blocks
void bind_quant_search(pybind11::module_& m);  // bindings_quant_search.cpp: calibrated, error feedback
// The host side of the CUDA kernels' per-block arithmetic (cuda/*.cuh PE_HD functions), for CPU tests.
void bind_cuda_quant(pybind11::module_& m);      // bindings_cuda_quant.cpp
void bind_cuda_attention(pybind11::module_& m);  // bindings_cuda_attention.cpp
void bind_cuda_sampling(pybind11::module_& m);   // bindings_cuda_sampling.cpp
}  // namespace pe
