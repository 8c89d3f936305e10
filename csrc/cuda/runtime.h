// The CUDA runtime as the rest of the engine sees it: plain C++ declarations, so that host files
// (executor.cpp, bindings) need no CUDA headers. Implemented in cuda/runtime.cu; in a build without
// CUDA, executor.cpp answers "no CUDA backend in this build" instead of calling these.
#pragma once
#include <cstddef>
#include <cstdint>

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
// How many device allocations and frees this process has made: a captured graph holds the addresses
// of its buffers, so it is replayed only while this count is the one it was captured at.
uint64_t alloc_epoch();

// CUDA graphs: the work queued on `stream` between begin and end is recorded instead of run, then
// instantiated (cudaGraphExec_t as void*). end_capture returns nullptr when the capture was
// invalidated (an API call that a capture cannot record); the stream is usable again either way.
void begin_capture(void* stream);
void* end_capture(void* stream);
void graph_launch(void* exec, void* stream);
void graph_destroy(void* exec);

}  // namespace pe::cuda
