// What the quantizer bindings (bindings_quantize.cpp, bindings_quant_search.cpp) share.
#pragma once
#include <pybind11/numpy.h>

#include <cstdint>
#include <string>

namespace pe {

using F32Array = pybind11::array_t<float, pybind11::array::c_style | pybind11::array::forcecast>;

// The per-column importance of a quantizer call as a float pointer (None: nullptr), the array kept alive in
// `keep`; a ModelFormatError naming `what` unless it is one vector of `cols` values.
const float* importance_vector(const pybind11::object& importance, int64_t cols, const std::string& what,
                               F32Array& keep);

}  // namespace pe
