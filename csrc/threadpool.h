// A persistent pool of worker threads for the forward pass.
//
// Work is a set of items that the calling thread and the workers claim one at a time; the caller takes
// part and returns when every item is done. A worker joins a job only while it still has unclaimed
// items: one that the OS has descheduled (another process on the core, more threads than free cores)
// delays at most the item it holds, never the whole job, and one that wakes after the caller has
// claimed everything simply skips it. Workers spin briefly between jobs (a decode step issues hundreds
// of small jobs, and a futex wake per job would cost more than the job), then sleep, so that neither an
// idle engine nor one whose caller is busy between passes takes CPU from other threads.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <algorithm>
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

  // Calls body(begin, end) over [0, n) in contiguous ranges, about four per thread, or once on the
  // calling thread when n < min_parallel (waking the workers would cost more than the work).
  template <typename F>
  void for_range(int64_t n, int64_t min_parallel, F&& body) {
    if (n < min_parallel || n_threads_ == 1) {
      body(int64_t(0), n);
      return;
    }
    const int64_t chunks = std::min<int64_t>(n, 4 * int64_t(n_threads_));
    for_each_dynamic(chunks, [&](int64_t c) { body(c * n / chunks, (c + 1) * n / chunks); });
  }

  // Calls body(i) for every i in [0, n), each participating thread taking the next unclaimed i (items
  // of uneven cost, such as attention blocks whose later query rows see more keys, balance out too).
  template <typename F>
  void for_each_dynamic(int64_t n, F&& body) {
    if (n <= 1 || n_threads_ == 1) {
      for (int64_t i = 0; i < n; i++) body(i);
      return;
    }
    struct Job {
      F& body;
      int64_t n;
      std::atomic<int64_t> next{0};
      static void work(void* obj) {
        Job& j = *static_cast<Job*>(obj);
        for (int64_t i = j.next.fetch_add(1, std::memory_order_relaxed); i < j.n;
             i = j.next.fetch_add(1, std::memory_order_relaxed))
          j.body(i);
      }
    } job{body, n};
    run_job(&Job::work, &job);
  }

  // for_range's min_parallel for rows of `row_elems` elements of light work each (a norm, an
  // activation, rounding x to 8 bits; not RoPE, whose sines and cosines per row cost more): the
  // workers are woken from about 16K elements in all. Below that the hand-off costs about what the
  // work does (SmolLM2 at 8 rows: 8 x 576 for a norm), and a decode step has hundreds of such ops.
  static int64_t min_rows_for(int64_t row_elems) {
    constexpr int64_t kMinParallelElems = int64_t(1) << 14;
    return std::max<int64_t>(2, kMinParallelElems / std::max<int64_t>(row_elems, 1));
  }
  // Splits [0, n) into nth contiguous ranges; returns thread ith's [begin, end).
  static void split(int64_t n, int ith, int nth, int64_t& begin, int64_t& end) {
    const int64_t per = (n + nth - 1) / nth;
    begin = std::min<int64_t>(n, per * ith);
    end = std::min<int64_t>(n, begin + per);
  }

 private:
  using Work = void (*)(void*);
  // Runs work(obj) on the calling thread and on every worker that joins before the caller has finished
  // its own call; returns when all of them are done.
  void run_job(Work work, void* obj);
  void worker();

  // state_: job number (high 32 bits), kClosed (the caller is done: no more joining), and the number of
  // workers inside the job (low bits). One word, so that joining (a compare-exchange that checks the
  // job is the same and still open) and closing cannot cross.
  static constexpr uint64_t kClosed = uint64_t(1) << 31;
  static constexpr uint64_t kActive = kClosed - 1;

  int n_threads_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> state_{kClosed};
  std::atomic<bool> stop_{false};
  std::atomic<int> sleepers_{0};
  Work work_ = nullptr;
  void* obj_ = nullptr;
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace pe
