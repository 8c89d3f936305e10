// Where ops run: a device, and what running work there needs. On the CPU that is the thread pool
// every context of a model shares (one pool per loaded model, not per sequence); a GPU backend adds
// its stream and scratch memory. One forward pass runs on an executor at a time: contexts that share it take turns
// through lock(), so two of them never fight over the same cores.
#pragma once
#include <cstdint>
#include <functional>
#include <list>
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
  // Runs `work`, ops queued on this executor with everything they read from the host already uploaded
  // (no host-to-device copy, allocation or synchronisation inside), as a CUDA graph on a GPU: captured
  // the second time `key` is seen (the first run sizes every buffer), replayed from then on. A decode
  // step is hundreds of kernels of a few microseconds each; launched one by one, the GPU waited on the
  // host between them. `key` must name everything the work's launches depend on (shapes, buffers, the
  // host-side choices of its ops); device allocations since the capture are part of it. Elsewhere
  // (the CPU, PYENGINE_CUDA_GRAPHS=0, a capture that failed) it just runs `work`.
  void run_captured(std::vector<int64_t> key, const std::function<void()>& work);
  // Whether run_captured is recording (copy_between and upload_workspace refuse host copies then).
  bool capturing() const { return capturing_; }
  // How many run_captured calls replayed a graph, and how many graphs are kept (for tests).
  int64_t graph_replays() const { return graph_replays_; }
  size_t graphs_kept() const;

 private:
  Executor(Device device, int n_threads);
  Device device_;
  std::unique_ptr<ThreadPool> pool_;
  void* stream_ = nullptr;
  std::vector<Buffer> workspace_;
  std::vector<std::vector<uint8_t>> uploaded_;  // per slot: the bytes of its last upload_workspace
  std::mutex mu_;
  // Captured passes, most recently used first (at most kMaxGraphs): a key seen once has no graph yet;
  // one whose capture failed keeps none.
  struct Graph {
    std::vector<int64_t> key;
    void* exec = nullptr;
    bool failed = false;
  };
  std::list<Graph> graphs_;
  bool graphs_on_ = false;
  bool capturing_ = false;
  int64_t graph_replays_ = 0;
};

}  // namespace pe
