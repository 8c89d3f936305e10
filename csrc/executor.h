// Where ops run: a device, and what running work there needs. On the CPU that is the thread pool
// every context of a model shares (one pool per loaded model, not per sequence); a GPU backend adds
// its stream and scratch memory. One forward pass runs on an executor at a time: contexts that share it take turns
// through lock(), so two of them never fight over the same cores.
#pragma once
#include <memory>
#include <mutex>
#include <vector>

#include "tensor.h"
#include "threadpool.h"

namespace pe {

// Copies n bytes within one device's memory.
void device_copy(Device device, void* dst, const void* src, size_t n);
// Copies n bytes between devices (or within one); a copy to the host waits for the data.
class Executor;
void copy_between(Executor& ex, Device dst_device, void* dst, Device src_device, const void* src, size_t n);

// Whether this build has the CUDA backend, and how many CUDA devices the machine has.
bool cuda_built();
int cuda_device_count();

class Executor {
 public:
  // A CPU executor with n_threads worker threads (the caller of a pass is thread 0).
  static std::shared_ptr<Executor> cpu(int n_threads);
  // A CUDA executor: its own stream on the current device. Throws when the build or the machine has no CUDA.
  static std::shared_ptr<Executor> cuda();
  ~Executor();

  Device device() const { return device_; }
  int n_threads() const { return pool_ ? pool_->size() : 1; }
  // The CPU thread pool (CPU executors only).
  ThreadPool& pool();
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(mu_); }
  // The CUDA stream (cudaStream_t) work is queued on (CUDA executors only).
  void* stream() const { return stream_; }
  // Scratch memory of this device for an op's temporaries (page tables, split-K partials): slot
  // `slot`, at least `bytes`, kept between calls. Valid until the next call with the same slot.
  void* workspace(int slot, size_t bytes);
  // Workspace slot `slot` holding the n bytes at host address src, copied there unless the slot's
  // last upload_workspace was of the same bytes into the same buffer (then nothing is queued). For
  // per-pass tables that every layer uploads (attention's page table: one pageable copy per pass
  // instead of one per layer). A slot used this way must not be written otherwise.
  void* upload_workspace(int slot, const void* src, size_t n);
  // Waits for the work queued so far (a no-op on the CPU).
  void synchronize();

 private:
  Executor(Device device, int n_threads);
  Device device_;
  std::unique_ptr<ThreadPool> pool_;
  void* stream_ = nullptr;
  std::vector<Buffer> workspace_;
  std::vector<std::vector<uint8_t>> uploaded_;  // per slot: the bytes of its last upload_workspace
  std::mutex mu_;
};

}  // namespace pe
