// The CUDA runtime as the rest of the engine sees it: plain C++ declarations, so that host files
// (executor.cpp, bindings) need no CUDA headers. Implemented in cuda/runtime.cu; in a build without
// CUDA, executor.cpp answers "no CUDA backend in this build" instead of calling these.
#pragma once
#include <cstddef>

namespace pe::cuda {

// Number of CUDA devices the runtime sees (0 when there is no driver or no device).
int device_count();
// Free and total memory of the current device, bytes.
void memory_info(size_t* free_bytes, size_t* total_bytes);
// One line naming the device ("NVIDIA H100 80GB HBM3, sm_90, 79.1 GiB").
const char* device_description();

void* device_alloc(size_t bytes);  // throws DeviceMemoryError with the size when it does not fit
void device_free(void* p);
void* stream_create();
void stream_destroy(void* stream);
void stream_synchronize(void* stream);
// Copies on `stream` (host memory may be pageable; the call returns once `src` may be reused).
void copy_host_to_device(void* dst, const void* src, size_t n, void* stream);
void copy_device_to_host(void* dst, const void* src, size_t n, void* stream);  // synchronous
void copy_device_to_device(void* dst, const void* src, size_t n, void* stream);
void memset_device(void* dst, int value, size_t n, void* stream);

}  // namespace pe::cuda
