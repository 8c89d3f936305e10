// Shared by the CUDA op files: error checks, the executor's stream and scratch memory, float
// conversions.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common.h"
#include "executor.h"

#define PE_CUDA_CHECK(call)                                                                             \
  do {                                                                                                  \
    const cudaError_t pe_err_ = (call);                                                                 \
    if (pe_err_ != cudaSuccess)                                                                         \
      PE_THROW(Error, "CUDA error in ", #call, " (", __FILE__, ":", __LINE__, "): ", cudaGetErrorString(pe_err_)); \
  } while (0)
// After a kernel launch: a bad launch configuration fails here, not at some later call.
#define PE_CUDA_LAUNCHED() PE_CUDA_CHECK(cudaGetLastError())

namespace pe::cuda {

inline cudaStream_t stream_of(Executor& ex) { return static_cast<cudaStream_t>(ex.stream()); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The current device's multiprocessors (asked once: the engine uses one device).
inline int multiprocessor_count() {
  static const int n = [] {
    int dev = 0, count = 0;
    PE_CUDA_CHECK(cudaGetDevice(&dev));
    PE_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev));
    return count;
  }();
  return n;
}

}  // namespace pe::cuda
