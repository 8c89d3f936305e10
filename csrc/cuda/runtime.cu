#include <atomic>
#include <cstdio>
#include <string>

#include "cuda/common.cuh"
#include "cuda/runtime.h"

namespace pe::cuda {

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: not an error for the caller, just none
    return 0;
  }
  return n;
}

void memory_info(size_t* free_bytes, size_t* total_bytes) { PE_CUDA_CHECK(cudaMemGetInfo(free_bytes, total_bytes)); }

const char* device_description() {
  static std::string desc;
  int dev = 0;
  cudaDeviceProp p{};
  PE_CUDA_CHECK(cudaGetDevice(&dev));
  PE_CUDA_CHECK(cudaGetDeviceProperties(&p, dev));
  char buf[320];
  std::snprintf(buf, sizeof buf, "%s, sm_%d%d, %.1f GiB", p.name, p.major, p.minor,
                double(p.totalGlobalMem) / double(1ull << 30));
  desc = buf;
  return desc.c_str();
}

namespace {
std::atomic<uint64_t> g_alloc_epoch{0};
}  // namespace

uint64_t alloc_epoch() { return g_alloc_epoch.load(); }

void* device_alloc(size_t bytes) {
  g_alloc_epoch++;
  void* p = nullptr;
  const cudaError_t err = cudaMalloc(&p, bytes);
  if (err != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    PE_THROW(DeviceMemoryError, "GPU out of memory: could not allocate ", bytes >> 20, " MiB (", free_b >> 20,
             " MiB free of ", total_b >> 20, " MiB): ", cudaGetErrorString(err));
  }
  return p;
}

void device_free(void* p) {
  g_alloc_epoch++;
  cudaFree(p);
}

void* stream_create() {
  cudaStream_t s = nullptr;
  // A blocking stream: work on the legacy default stream (cache page copies, memsets) is ordered with it.
  PE_CUDA_CHECK(cudaStreamCreate(&s));
  return s;
}

void stream_destroy(void* s) { cudaStreamDestroy(static_cast<cudaStream_t>(s)); }

void stream_synchronize(void* s) { PE_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s))); }

void copy_host_to_device(void* dst, const void* src, size_t n, void* s) {
  PE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(s)));
  // Sources are pageable host vectors: the copy is staged before cudaMemcpyAsync returns, so the
  // caller may reuse them at once (this would not hold for pinned memory).
  if (s == nullptr) PE_CUDA_CHECK(cudaDeviceSynchronize());
}

void copy_device_to_host(void* dst, const void* src, size_t n, void* s) {
  PE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(s)));
  PE_CUDA_CHECK(cudaStreamSynchronize(static_cast<cudaStream_t>(s)));
}

void copy_device_to_device(void* dst, const void* src, size_t n, void* s) {
  PE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(s)));
  if (s == nullptr) PE_CUDA_CHECK(cudaDeviceSynchronize());
}

void memset_device(void* dst, int value, size_t n, void* s) {
  PE_CUDA_CHECK(cudaMemsetAsync(dst, value, n, static_cast<cudaStream_t>(s)));
  if (s == nullptr) PE_CUDA_CHECK(cudaDeviceSynchronize());
}

void begin_capture(void* s) {
  // Thread-local: only this thread's calls that a capture cannot record (a synchronisation, an allocation)
  // invalidate it; other threads' contexts keep working.
  PE_CUDA_CHECK(cudaStreamBeginCapture(static_cast<cudaStream_t>(s), cudaStreamCaptureModeThreadLocal));
}

void* end_capture(void* s) {
  cudaGraph_t graph = nullptr;
  const cudaError_t err = cudaStreamEndCapture(static_cast<cudaStream_t>(s), &graph);
  if (err != cudaSuccess || graph == nullptr) {
    cudaGetLastError();  // an invalidated capture is not a sticky error
    if (graph) cudaGraphDestroy(graph);
    return nullptr;
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    cudaGetLastError();
    return nullptr;
  }
  return exec;
}

void graph_launch(void* exec, void* s) {
  PE_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec), static_cast<cudaStream_t>(s)));
}

void graph_destroy(void* exec) { cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec)); }

}  // namespace pe::cuda
