// The CUDA kernels' dequantisation (cuda/quant_blocks.cuh) run on the host, so that tests compare it
// with the CPU backend and gguf-py on machines without a GPU. Compiled in every build, with or
// without CUDA: it includes only the host-clean header.
#include <pybind11/numpy.h>

#include <algorithm>

#include "bindings.h"
#include "common.h"
#include "cuda/quant_blocks.cuh"
#include "ggml_types.h"

namespace py = pybind11;

namespace pe {

namespace {

py::array_t<float> cuda_host_dequantize(const py::buffer& w, uint32_t type_id, int64_t rows, int64_t cols) {
  // Bad arguments raise pe errors (ModelFormatError is a ValueError), as the engine's own checks do.
  const py::buffer_info info = w.request();
  PE_CHECK(info.itemsize == 1, ModelFormatError, "weights must be raw bytes (a uint8 array or bytes)");
  PE_CHECK(rows >= 0 && cols > 0, ModelFormatError, "bad weight shape ", rows, " x ", cols);
  PE_CHECK(type_traits(type_id), UnsupportedModelError, "unknown tensor type id ", type_id);
  const GGMLType t = GGMLType(type_id);
  PE_CHECK(cuda::chunk_type_supported(t), UnsupportedModelError, "type ", type_name(type_id),
           " has no CUDA chunk decoder");
  ssize_t expected_stride = 1;
  for (ssize_t i = info.ndim - 1; i >= 0; i--) {
    PE_CHECK(info.shape[i] == 1 || info.strides[i] == expected_stride, ModelFormatError,
             "weight bytes must be C-contiguous");
    expected_stride *= info.shape[i];
  }
  const size_t rb = row_bytes(t, cols);  // throws if cols is not a multiple of the block size
  PE_CHECK(size_t(info.size) == rb * size_t(rows), ModelFormatError, "weights of type ", type_name(type_id), " ",
           rows, " x ", cols, " take ", rb * size_t(rows), " bytes, got ", info.size);
  py::array_t<float> out({rows, cols});
  const auto* src = static_cast<const uint8_t*>(info.ptr);
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    const int64_t n_chunks = (cols + cuda::kChunk - 1) / cuda::kChunk;
    float chunk[cuda::kChunk];
    for (int64_t r = 0; r < rows; r++) {
      const uint8_t* row = src + size_t(r) * rb;
      float* out_row = dst + r * cols;
      for (int64_t c = 0; c < n_chunks; c++) {
        cuda::dequantize_chunk(t, row, cols, c, chunk);
        const int64_t n = std::min<int64_t>(cuda::kChunk, cols - c * cuda::kChunk);
        std::copy(chunk, chunk + n, out_row + c * cuda::kChunk);
      }
    }
  }
  return out;
}

}  // namespace

void bind_cuda_quant(py::module_& m) {
  m.def("cuda_host_dequantize", &cuda_host_dequantize, py::arg("w"), py::arg("type_id"), py::arg("rows"),
        py::arg("cols"),
        "Raw GGUF bytes of a rows x cols matrix of ggml type `type_id` as float32 (rows, cols), decoded on "
        "the host by the CUDA kernels' chunk decoders (cuda/quant_blocks.cuh). For tests.");
}

}  // namespace pe
