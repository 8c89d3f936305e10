#include "threadpool.h"

#include <algorithm>
#include <chrono>
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
  for (int i = 1; i < n_threads_; i++) threads_.emplace_back([this] { worker(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_.store(true);
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void ThreadPool::run_job(Work work, void* obj) {
  // The previous job is closed with no worker inside (run_job waits for that), so nobody reads these.
  work_ = work;
  obj_ = obj;
  const uint64_t job = (state_.load(std::memory_order_relaxed) >> 32) + 1;
  {
    // Publishing under the lock pairs with the sleepers' predicate check: no lost wake-up.
    std::lock_guard<std::mutex> lock(mu_);
    state_.store(job << 32, std::memory_order_release);
  }
  if (sleepers_.load(std::memory_order_acquire) > 0) cv_.notify_all();
  work(obj);
  // Every item is claimed: close the job, then wait for the workers that joined to finish theirs. Spin
  // briefly, then yield: on a loaded machine such a worker may need our core to finish.
  uint64_t s = state_.fetch_or(kClosed, std::memory_order_acq_rel) | kClosed;
  for (int spin = 0; (s & kActive) != 0; spin++) {
    if (spin < 4096) PE_PAUSE();
    else std::this_thread::yield();
    s = state_.load(std::memory_order_acquire);
  }
}

// How long a worker waits for the next job before it sleeps: ~4096 pauses (about 100 us on Zen 4), then
// yields (which hand the core to a thread that has work, where there are more threads than cores) up
// to this long in all. A forward pass's jobs follow each other within microseconds; the gaps between
// passes, where the caller runs Python (a server's sampling and streaming, ~0.5 ms), are better slept
// through, leaving both cores to the threads that run them. Until 2026-11-29 the yields went on for
// 200,000 of them (tens of ms): SmolLM2 Q4_0 behind `pyengine serve` with 8 streaming clients on 2
// Zen 4 cores, 778-1053 (median ~865) -> 963-1082 (~1028) tok/s over 8 and 4 runs; decode in one
// process at 1, 4 and 8 sequences, at -t 4 on 2 cores and beside a busy process unchanged (paired runs).
constexpr auto kMaxWait = std::chrono::microseconds(300);

void ThreadPool::worker() {
  uint64_t seen = 0;  // the last job this worker joined or skipped
  for (;;) {
    uint64_t s = state_.load(std::memory_order_acquire);
    const auto waiting_since = std::chrono::steady_clock::now();
    for (int spin = 0; (s >> 32) == seen && !stop_.load(std::memory_order_relaxed); spin++) {
      if (spin < 4096) {
        PE_PAUSE();
      } else {
        if (std::chrono::steady_clock::now() - waiting_since > kMaxWait) break;
        std::this_thread::yield();
      }
      s = state_.load(std::memory_order_acquire);
    }
    if ((s >> 32) == seen && !stop_.load()) {
      std::unique_lock<std::mutex> lock(mu_);
      sleepers_.fetch_add(1);
      cv_.wait(lock, [&] { return (state_.load(std::memory_order_acquire) >> 32) != seen || stop_.load(); });
      sleepers_.fetch_sub(1);
      s = state_.load(std::memory_order_acquire);
    }
    if (stop_.load()) return;
    // Join the job while it is open: the exchange fails if the caller closed it (or a later job began)
    // since s was read, and s then holds what it is now.
    while ((s >> 32) != seen && !(s & kClosed)) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        work_(obj_);
        state_.fetch_sub(1, std::memory_order_release);
        break;
      }
    }
    seen = s >> 32;
  }
}

}  // namespace pe
