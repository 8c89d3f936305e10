// Where ops run: a device, and what running work there needs. On the CPU that is the thread pool
// every context of a model shares (one pool per loaded model, not per sequence); a GPU backend adds
// its stream here. One forward pass runs on an executor at a time: contexts that share it take turns
// through lock(), so two of them never fight over the same cores.
#pragma once
#include <memory>
#include <mutex>

#include "tensor.h"
#include "threadpool.h"

namespace pe {

// Copies n bytes within one device's memory.
void device_copy(Device device, void* dst, const void* src, size_t n);

class Executor {
 public:
  // A CPU executor with n_threads worker threads (the caller of a pass is thread 0).
  static std::shared_ptr<Executor> cpu(int n_threads);

  Device device() const { return device_; }
  int n_threads() const { return pool_ ? pool_->size() : 1; }
  // The CPU thread pool (CPU executors only).
  ThreadPool& pool();
  std::unique_lock<std::mutex> lock() { return std::unique_lock<std::mutex>(mu_); }

 private:
  Executor(Device device, int n_threads);
  Device device_;
  std::unique_ptr<ThreadPool> pool_;
  std::mutex mu_;
};

}  // namespace pe
