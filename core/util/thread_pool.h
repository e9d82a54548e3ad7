// A persistent pool of worker threads for data-parallel loops in the hot path.
//
// Thread-compatible: ParallelFor is called by one owner thread at a time (the model runner's
// loop); the workers only ever run the loop body it hands them. Nothing allocates per call,
// so it is safe to use in the decode loop.
//
// The calling thread works too, and waits only for tasks that were started, never for idle
// workers: when other processes hold the cores (several servers on one machine), a worker
// that is not scheduled in time simply takes no task instead of stalling the loop.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace dsmoe {

class ThreadPool {
 public:
  // `num_threads` counts the calling thread: 1 runs everything inline, N starts N-1 workers.
  // 0 means one per CPU this process may use (UsableCpus: affinity mask and cgroup quota).
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
  // Claims and runs tasks of job `generation` until none is left or the job has changed.
  void DrainTasks(uint64_t generation, int thread);

  int num_threads_;
  std::vector<std::thread> workers_;
  uint64_t last_generation_ = 0;  // owner thread only

  // The current job. Its fields are written before the generation that publishes it, and only
  // read by a thread that has claimed one of its tasks (see DrainTasks).
  std::atomic<InvokeFn> invoke_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> num_tasks_{0};
  // High 32 bits: the job's generation; low 32 bits: the next task to claim.
  alignas(64) std::atomic<uint64_t> next_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint64_t> generation_{0};
  std::atomic<bool> stop_{false};
};

}  // namespace dsmoe
