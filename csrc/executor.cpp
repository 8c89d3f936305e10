#include "executor.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#ifdef PE_CUDA
#include "cuda/runtime.h"
#endif

namespace pe {

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

#ifdef PE_CUDA
bool cuda_built() { return true; }
int cuda_device_count() { return cuda::device_count(); }
#define PE_NEED_CUDA() (void)0
#else
bool cuda_built() { return false; }
int cuda_device_count() { return 0; }
#define PE_NEED_CUDA() PE_THROW(UnsupportedModelError, "this build of pyengine has no CUDA backend")
namespace cuda {
// Never called: every CUDA path checks PE_NEED_CUDA() first. They keep the code below one path.
inline void* device_alloc(size_t) { return nullptr; }
inline void device_free(void*) {}
inline void* stream_create() { return nullptr; }
inline void stream_destroy(void*) {}
inline void stream_synchronize(void*) {}
inline void copy_host_to_device(void*, const void*, size_t, void*) {}
inline void copy_device_to_host(void*, const void*, size_t, void*) {}
inline void copy_device_to_device(void*, const void*, size_t, void*) {}
inline void memset_device(void*, int, size_t, void*) {}
inline uint64_t alloc_epoch() { return 0; }
inline void begin_capture(void*) {}
inline void* end_capture(void*) { return nullptr; }
inline void graph_launch(void*, void*) {}
inline void graph_destroy(void*) {}
}  // namespace cuda
#endif

Executor::Executor(Device device, int n_threads) : device_(device) {
  if (device == Device::CPU) pool_ = std::make_unique<ThreadPool>(n_threads);
}

Executor::~Executor() {
  for (Graph& g : graphs_)
    if (g.exec) cuda::graph_destroy(g.exec);
  workspace_.clear();
  if (stream_) cuda::stream_destroy(stream_);
}

std::shared_ptr<Executor> Executor::cpu(int n_threads) {
  PE_CHECK(n_threads >= 1 && n_threads <= 1024, Error, "n_threads must be in [1, 1024], not ", n_threads);
  return std::shared_ptr<Executor>(new Executor(Device::CPU, n_threads));
}

std::shared_ptr<Executor> Executor::cuda() {
  PE_NEED_CUDA();
  PE_CHECK(cuda_device_count() > 0, UnsupportedModelError, "no CUDA device found (no GPU, or no NVIDIA driver)");
  std::shared_ptr<Executor> ex(new Executor(Device::CUDA, 1));
  ex->stream_ = cuda::stream_create();
  const char* graphs = std::getenv("PYENGINE_CUDA_GRAPHS");
  ex->graphs_on_ = !(graphs && std::strcmp(graphs, "0") == 0);
  return ex;
}

ThreadPool& Executor::pool() {
  PE_CHECK(pool_, Error, "the ", device_name(device_), " executor has no CPU thread pool");
  return *pool_;
}

void* Executor::workspace(int slot, size_t bytes) {
  PE_CHECK(slot >= 0 && slot < 64, Error, "workspace slot ", slot, " out of range");
  if (size_t(slot) >= workspace_.size()) workspace_.resize(size_t(slot) + 1);
  Buffer& b = workspace_[size_t(slot)];
  if (b.device() != device_ || b.size() < bytes) {
    PE_CHECK(!capturing_, Error, "workspace slot ", slot, " grows inside a captured pass");
    // The GPU may still be reading the old buffer: freeing it must wait for the queued work.
    synchronize();
    b = Buffer(device_, bytes + bytes / 4);
  }
  return b.data();
}

void* Executor::upload_workspace(int slot, const void* src, size_t n) {
  const void* before = size_t(slot) < workspace_.size() ? workspace_[size_t(slot)].data() : nullptr;
  void* dst = workspace(slot, n);
  if (size_t(slot) >= uploaded_.size()) uploaded_.resize(size_t(slot) + 1);
  std::vector<uint8_t>& last = uploaded_[size_t(slot)];
  const auto* bytes = static_cast<const uint8_t*>(src);
  if (dst == before && last.size() == n && (n == 0 || std::memcmp(last.data(), bytes, n) == 0)) return dst;
  copy_between(*this, device_, dst, Device::CPU, src, n);
  last.assign(bytes, bytes + n);
  return dst;
}

size_t Executor::graphs_kept() const {
  size_t n = 0;
  for (const Graph& g : graphs_) n += g.exec != nullptr;
  return n;
}

void Executor::run_captured(std::vector<int64_t> key, const std::function<void()>& work) {
  if (device_ != Device::CUDA || !graphs_on_) return work();
  key.push_back(int64_t(cuda::alloc_epoch()));
  // A handful of keys is enough: a decode step's key changes only with the batch's shape and, while
  // the longest sequence is short, with its page count.
  constexpr size_t kMaxGraphs = 16;
  auto it = std::find_if(graphs_.begin(), graphs_.end(), [&](const Graph& g) { return g.key == key; });
  if (it == graphs_.end()) {
    if (graphs_.size() == kMaxGraphs) {
      if (graphs_.back().exec) cuda::graph_destroy(graphs_.back().exec);
      graphs_.pop_back();
    }
    graphs_.push_front(Graph{key});
    return work();  // first sighting: run it as it is, which sizes the buffers it uses
  }
  graphs_.splice(graphs_.begin(), graphs_, it);
  Graph& g = graphs_.front();
  if (g.exec) {
    cuda::graph_launch(g.exec, stream_);
    graph_replays_++;
    return;
  }
  if (g.failed) return work();
  // Capture: `work` queues its kernels into a graph instead of running them. Anything it cannot record
  // (a host copy, a buffer that grows, a synchronisation) fails the capture; the key then runs
  // without one, and the upload cache is forgotten (a refused upload may have been recorded as done).
  cuda::begin_capture(stream_);
  capturing_ = true;
  void* exec = nullptr;
  try {
    work();
    capturing_ = false;
    exec = cuda::end_capture(stream_);
  } catch (...) {
    capturing_ = false;
    if (void* partial = cuda::end_capture(stream_)) cuda::graph_destroy(partial);
  }
  if (exec && int64_t(cuda::alloc_epoch()) != key.back()) {
    cuda::graph_destroy(exec);  // it allocated: the buffers it captured are not the ones the key names
    exec = nullptr;
  }
  if (!exec) {
    g.failed = true;
    uploaded_.clear();
    return work();
  }
  g.exec = exec;
  cuda::graph_launch(exec, stream_);
}

void Executor::synchronize() {
  if (stream_) cuda::stream_synchronize(stream_);
}

void device_copy(Device device, void* dst, const void* src, size_t n) {
  if (n == 0) return;
  if (device == Device::CPU) {
    std::memcpy(dst, src, n);
    return;
  }
  PE_NEED_CUDA();
  cuda::copy_device_to_device(dst, src, n, nullptr);
}

void copy_between(Executor& ex, Device dst_device, void* dst, Device src_device, const void* src, size_t n) {
  if (n == 0) return;
  if (dst_device == Device::CPU && src_device == Device::CPU) {
    std::memcpy(dst, src, n);
    return;
  }
  PE_NEED_CUDA();
  PE_CHECK(!ex.capturing() || dst_device == src_device, Error,
           "a copy between host and GPU inside a captured pass (upload it before the pass)");
  void* s = ex.stream();
  if (dst_device == Device::CUDA && src_device == Device::CUDA) cuda::copy_device_to_device(dst, src, n, s);
  else if (dst_device == Device::CUDA) cuda::copy_host_to_device(dst, src, n, s);
  else cuda::copy_device_to_host(dst, src, n, s);
}

Buffer::Buffer(Device device, size_t bytes) : device_(device) { reserve(bytes); }

Buffer::~Buffer() { release(); }

Buffer Buffer::huge_pages(size_t bytes) {
  constexpr size_t kHuge = size_t(2) << 20;
  if (bytes < kHuge) return Buffer(Device::CPU, bytes);
  Buffer b;
  b.size_ = (bytes + kHuge - 1) & ~(kHuge - 1);
  b.data_ = std::aligned_alloc(kHuge, b.size_);
  PE_CHECK(b.data_, Error, "out of memory allocating ", b.size_, " bytes");
#ifdef MADV_HUGEPAGE
  ::madvise(b.data_, b.size_, MADV_HUGEPAGE);  // advice only: without THP the pages stay small
#endif
  return b;
}

Buffer& Buffer::operator=(Buffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = o.data_;
    size_ = o.size_;
    device_ = o.device_;
    o.data_ = nullptr;
    o.size_ = 0;
  }
  return *this;
}

void Buffer::release() {
  if (data_) {
    if (device_ == Device::CPU) std::free(data_);
    else cuda::device_free(data_);
  }
  data_ = nullptr;
  size_ = 0;
}

void Buffer::reserve(size_t bytes) {
  if (bytes <= size_) return;
  if (device_ != Device::CPU) PE_NEED_CUDA();
  release();
  const size_t rounded = (bytes + 255) & ~size_t(255);
  if (device_ == Device::CPU) {
    data_ = std::aligned_alloc(64, rounded);
    PE_CHECK(data_, Error, "out of memory allocating ", rounded, " bytes");
  } else {
    data_ = cuda::device_alloc(rounded);
  }
  size_ = rounded;
}

void Buffer::zero() {
  if (!data_) return;
  if (device_ == Device::CPU) std::memset(data_, 0, size_);
  else cuda::memset_device(data_, 0, size_, nullptr);
}

}  // namespace pe
