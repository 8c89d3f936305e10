// Tensors that know where they live, and the memory behind them.
//
// A Tensor is a non-owning view of a 2-D array: `rows` rows of `cols` elements of `type`, rows
// `row_stride` bytes apart, on `device`. Weights are views into the model file's mapping (any GGUF
// type); activations are F32 views into a Buffer. Ops take Tensors, check their shapes once in the
// device-neutral op file (csrc/ops/<op>.cpp) and hand them to the backend the device names.
#pragma once
#include <cstddef>
#include <cstdint>

#include "common.h"
#include "ggml_types.h"

namespace pe {

enum class Device : uint8_t { CPU, CUDA };
const char* device_name(Device d);

struct Tensor {
  GGMLType type = GGMLType::F32;
  void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_stride = 0;  // bytes
  Device device = Device::CPU;
  // A quantized weight's copy in the CPU kernels' panel layout (cpu/panels.h), which they read instead
  // of `data` when its panel height is theirs; `data` stays the file's row-major bytes for every other
  // reader (embedding lookups, GPU uploads, statistics). Null: none.
  const void* panels = nullptr;
  int panel_rows = 0;

  bool empty() const { return data == nullptr; }
  // Row r as typed pointer (F32 tensors only: checked by the op files, not here).
  float* row(int64_t r) const { return reinterpret_cast<float*>(static_cast<uint8_t*>(data) + r * row_stride); }
  int64_t ld() const { return int64_t(row_stride / sizeof(float)); }  // F32 row stride in elements
  // Rows [r0, r0 + n). The panel copy goes with a view that starts on a panel boundary (a panel of
  // panel_rows rows takes as many bytes as the rows), and is dropped from any other.
  Tensor rows_view(int64_t r0, int64_t n) const {
    Tensor t = *this;
    t.data = static_cast<uint8_t*>(data) + r0 * row_stride;
    if (panels && r0 % panel_rows == 0) t.panels = static_cast<const uint8_t*>(panels) + r0 * row_stride;
    else t.panels = nullptr, t.panel_rows = 0;
    t.rows = n;
    return t;
  }
  // Columns [c0, c0 + n) of an F32 tensor (e.g. the K part of a fused QKV activation).
  Tensor cols_view(int64_t c0, int64_t n) const {
    Tensor t = *this;
    t.data = reinterpret_cast<float*>(data) + c0;
    t.cols = n;
    return t;
  }
};

// An F32 view of `rows` x `cols` floats, `ld` floats apart.
inline Tensor f32_tensor(float* data, int64_t rows, int64_t cols, int64_t ld, Device d = Device::CPU) {
  return Tensor{GGMLType::F32, data, rows, cols, size_t(ld) * sizeof(float), d};
}
// A 1-D F32 vector as a one-row tensor (norm weights, biases).
inline Tensor f32_vector(const float* data, int64_t n, Device d = Device::CPU) {
  return f32_tensor(const_cast<float*>(data), 1, n, n, d);
}

// Memory on a device, owned; 64-byte aligned. Moves, never copies.
class Buffer {
 public:
  Buffer() = default;
  Buffer(Device device, size_t bytes);
  // Host memory that will be written whole (repacked weights), in transparent huge pages where the
  // OS allows them: a decode step streams all of it, and with 4 KiB pages the TLB misses stall the loads.
  static Buffer huge_pages(size_t bytes);
  ~Buffer();
  Buffer(Buffer&& o) noexcept { *this = static_cast<Buffer&&>(o); }
  Buffer& operator=(Buffer&& o) noexcept;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  void* data() const { return data_; }
  size_t size() const { return size_; }
  Device device() const { return device_; }
  // Grow to at least `bytes` (contents are not kept); a no-op when already large enough.
  void reserve(size_t bytes);
  void zero();

 private:
  void release();
  void* data_ = nullptr;
  size_t size_ = 0;
  Device device_ = Device::CPU;
};

}  // namespace pe
