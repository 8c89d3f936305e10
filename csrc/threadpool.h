// A persistent pool of worker threads for the forward pass.
// run(fn) calls fn(ith, nth) on every thread, the caller being thread 0, and returns when all are done.
// Workers spin briefly between jobs (a decode step issues hundreds of small jobs, and a futex wake
// per job would cost more than the job), then sleep so an idle engine uses no CPU.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace pe {

int physical_core_count();

class ThreadPool {
 public:
  explicit ThreadPool(int n_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return n_threads_; }

  template <typename F>
  void run(F&& fn) {
    using Fn = std::remove_reference_t<F>;
    run_impl([](void* obj, int ith, int nth) { (*static_cast<Fn*>(obj))(ith, nth); }, &fn);
  }

  // Calls body(begin, end) over [0, n) split into one contiguous range per thread, or once on the
  // calling thread when n < min_parallel (waking the workers would cost more than the work).
  template <typename F>
  void for_range(int64_t n, int64_t min_parallel, F&& body) {
    if (n < min_parallel || n_threads_ == 1) {
      body(int64_t(0), n);
      return;
    }
    run([&](int ith, int nth) {
      int64_t b, e;
      split(n, ith, nth, b, e);
      body(b, e);
    });
  }

  // Calls body(i) for every i in [0, n), each thread taking the next unclaimed i: for work items of
  // uneven cost (attention blocks: later query rows see more keys), and so that a thread that starts
  // late, or is descheduled, only delays the items it took.
  template <typename F>
  void for_each_dynamic(int64_t n, F&& body) {
    if (n <= 1 || n_threads_ == 1) {
      for (int64_t i = 0; i < n; i++) body(i);
      return;
    }
    std::atomic<int64_t> next{0};
    run([&](int, int) {
      for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
           i = next.fetch_add(1, std::memory_order_relaxed))
        body(i);
    });
  }

  // Splits [0, n) into nth contiguous ranges; returns thread ith's [begin, end).
  static void split(int64_t n, int ith, int nth, int64_t& begin, int64_t& end) {
    const int64_t per = (n + nth - 1) / nth;
    begin = std::min<int64_t>(n, per * ith);
    end = std::min<int64_t>(n, begin + per);
  }

 private:
  using Trampoline = void (*)(void*, int, int);
  void run_impl(Trampoline call, void* obj);
  void worker(int ith);

  int n_threads_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  Trampoline call_ = nullptr;
  void* obj_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace pe
