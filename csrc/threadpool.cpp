#include "threadpool.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <string>
#include <utility>

#if defined(PE_X86)
#include <immintrin.h>
#define PE_PAUSE() _mm_pause()
#else
#define PE_PAUSE() std::this_thread::yield()
#endif

namespace pe {

namespace {
int read_int(const std::string& path) {
  FILE* f = std::fopen(path.c_str(), "r");
  int v = -1;
  if (f) {
    if (std::fscanf(f, "%d", &v) != 1) v = -1;
    std::fclose(f);
  }
  return v;
}
}  // namespace

int physical_core_count() {
  // Count distinct (package, core) pairs; SMT siblings share one. Falls back to logical CPUs.
  std::set<std::pair<int, int>> cores;
  const unsigned n = std::max(1u, std::thread::hardware_concurrency());
  for (unsigned cpu = 0; cpu < n; cpu++) {
    const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
    // stdio, not iostreams: see str_cat in common.h on builds that carry their own libstdc++.
    const int c = read_int(base + "core_id"), p = read_int(base + "physical_package_id");
    if (c < 0 || p < 0) return int(n);
    cores.insert({p, c});
  }
  return cores.empty() ? int(n) : int(cores.size());
}

ThreadPool::ThreadPool(int n_threads) : n_threads_(std::max(1, n_threads)) {
  for (int i = 1; i < n_threads_; i++) threads_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
    generation_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::run_impl(Trampoline call, void* obj) {
  if (n_threads_ == 1) {
    call(obj, 0, 1);
    return;
  }
  call_ = call;
  obj_ = obj;
  pending_.store(n_threads_ - 1, std::memory_order_relaxed);
  {
    // Publishing under the lock pairs with the sleepers' predicate check: no lost wake-up.
    std::lock_guard<std::mutex> lock(mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
  call(obj, 0, n_threads_);
  // Spin briefly, then yield: on a loaded machine a descheduled worker needs our core to finish.
  for (int spin = 0; pending_.load(std::memory_order_acquire) != 0; spin++) {
    if (spin < 4096) PE_PAUSE();
    else std::this_thread::yield();
  }
}

void ThreadPool::worker(int ith) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < 200000; spin++) {
      if (spin < 4096) PE_PAUSE();
      else std::this_thread::yield();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      sleepers_.fetch_sub(1);
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    if (stop_.load()) return;
    call_(obj_, ith, n_threads_);
    pending_.fetch_sub(1, std::memory_order_release);
  }
}

}  // namespace pe
