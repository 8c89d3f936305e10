// pyengine._C is assembled from one bind_* function per area, each in its own bindings_*.cpp.
#pragma once
#include <pybind11/pybind11.h>

namespace pe {
void bind_kernels(pybind11::module_& m);  // bindings_kernels.cpp: ops on numpy arrays, for tests
void bind_gguf(pybind11::module_& m);     // bindings_gguf.cpp: GGUF reader
void bind_model(pybind11::module_& m);    // bindings_model.cpp: Model / Context
}  // namespace pe
