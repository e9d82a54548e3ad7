// A persistent pool of worker threads for data-parallel loops in the hot path.
//
// Thread-compatible: ParallelFor is called by one owner thread at a time (the model runner's
// loop); the workers only ever run the loop body it hands them. Nothing allocates per call,
// so it is safe to use in the decode loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace dsmoe {

class ThreadPool {
 public:
  // `num_threads` counts the calling thread: 1 runs everything inline, N starts N-1 workers.
  // 0 means one per hardware thread.
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }

  // Runs fn(task, thread) for every task in [0, num_tasks), spread over the threads (`thread`
  // in [0, num_threads())), and returns when all are done. Tasks are claimed in increasing
  // order, so give each a contiguous slice of memory to stream.
  template <class Fn>
  void ParallelFor(int64_t num_tasks, Fn&& fn) {
    if (num_tasks <= 0) return;
    if (num_threads_ == 1 || num_tasks == 1) {
      for (int64_t t = 0; t < num_tasks; ++t) fn(t, 0);
      return;
    }
    Run(num_tasks, &Invoke<std::remove_reference_t<Fn>>, &fn);
  }

 private:
  using InvokeFn = void (*)(void* ctx, int64_t task, int thread);
  template <class Fn>
  static void Invoke(void* ctx, int64_t task, int thread) {
    (*static_cast<Fn*>(ctx))(task, thread);
  }

  void Run(int64_t num_tasks, InvokeFn invoke, void* ctx);
  void WorkerLoop(int thread);
  void DrainTasks(int thread);

  int num_threads_;
  std::vector<std::thread> workers_;

  // The current job, published by bumping generation_.
  InvokeFn invoke_ = nullptr;
  void* ctx_ = nullptr;
  int64_t num_tasks_ = 0;
  alignas(64) std::atomic<int64_t> next_task_{0};
  alignas(64) std::atomic<int> busy_workers_{0};
  alignas(64) std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace dsmoe
