// Device dispatch for the device-neutral op files (ops/<op>.cpp): each op checks its arguments once,
// then calls the implementation of the executor's device, cpu::<op> (csrc/cpu/) or cuda::<op>
// (csrc/cuda/, compiled when the build has CUDA).
#pragma once
#include "cpu/ops.h"
#include "executor.h"

#ifdef PE_CUDA
#include "cuda/ops.h"
#define PE_CUDA_CASE(op, ...) \
  case ::pe::Device::CUDA: return ::pe::cuda::op(__VA_ARGS__);
#else
#define PE_CUDA_CASE(op, ...)
#endif

#define PE_DISPATCH(ex, op, ...)                                                                       \
  do {                                                                                                 \
    switch ((ex).device()) {                                                                           \
      case ::pe::Device::CPU: return ::pe::cpu::op(__VA_ARGS__);                                      \
      PE_CUDA_CASE(op, __VA_ARGS__)                                                                    \
      default:                                                                                         \
        PE_THROW(UnsupportedModelError, #op ": no ", ::pe::device_name((ex).device()), " backend in this build"); \
    }                                                                                                  \
  } while (0)

namespace pe {

// Argument checks shared by the op files; `what` names the op and argument in the message.
inline void check_device(const Executor& ex, const Tensor& t, const char* what) {
  PE_CHECK(t.device == ex.device(), Error, what, ": tensor on ", device_name(t.device), ", executor on ",
           device_name(ex.device()));
}
inline void check_f32(const Executor& ex, const Tensor& t, int64_t rows, int64_t cols, const char* what) {
  check_device(ex, t, what);
  PE_CHECK(t.type == GGMLType::F32, Error, what, ": expected F32, got ", type_name(uint32_t(t.type)));
  PE_CHECK(t.rows == rows && t.cols == cols, Error, what, ": shape ", t.rows, " x ", t.cols, ", expected ", rows,
           " x ", cols);
  PE_CHECK(rows == 0 || (t.data && t.row_stride >= size_t(cols) * sizeof(float)), Error, what,
           ": null data or row stride below the row size");
}
inline void check_i32(const Executor& ex, const Tensor& t, int64_t n, const char* what) {
  check_device(ex, t, what);
  PE_CHECK(t.type == GGMLType::I32 && t.rows == 1 && t.cols == n && (n == 0 || t.data), Error, what,
           ": expected an I32 vector of ", n, " elements");
}

}  // namespace pe
