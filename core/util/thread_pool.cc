#include "core/util/thread_pool.h"

#include "core/util/cpu_quota.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace dsmoe {

namespace {
inline void CpuRelax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}
// Workers spin this many rounds (tens of microseconds) for the next job before sleeping:
// decode issues a parallel loop every few microseconds, and a futex wake-up costs more than
// the loop itself; longer spinning would only burn cores other processes may need.
constexpr int kSpinRounds = 4096;
}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  if (num_threads <= 0) num_threads = UsableCpus();  // the container's quota, not the node's cores
  num_threads_ = num_threads < 1 ? 1 : num_threads;
  workers_.reserve(num_threads_ - 1);
  for (int t = 1; t < num_threads_; ++t) workers_.emplace_back([this, t] { WorkerLoop(t); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_release);
  generation_.notify_all();
  for (auto& w : workers_) w.join();
}

void ThreadPool::DrainTasks(uint64_t generation, int thread) {
  for (;;) {
    uint64_t v = next_.load(std::memory_order_acquire);
    do {
      // A job that has changed, or has no task left, is done for us. A successful claim below
      // proves the job is still `generation` and unfinished, so its fields are current.
      if ((v >> 32) != (generation & 0xffffffffu) ||
          static_cast<int64_t>(v & 0xffffffffu) >= num_tasks_.load(std::memory_order_seq_cst)) {
        return;
      }
    } while (!next_.compare_exchange_weak(v, v + 1, std::memory_order_seq_cst));
    invoke_.load(std::memory_order_relaxed)(ctx_.load(std::memory_order_relaxed),
                                            static_cast<int64_t>(v & 0xffffffffu), thread);
    done_.fetch_add(1, std::memory_order_release);
  }
}

void ThreadPool::Run(int64_t num_tasks, InvokeFn invoke, void* ctx) {
  const uint64_t generation = ++last_generation_;
  // The claim counter moves to the new generation before anything else changes: a worker still
  // draining the previous job could otherwise read the new task count, see an index of the old
  // job as unclaimed and win its CAS (the counter unchanged), running a task twice. Sequentially
  // consistent, so that whoever sees the new count also sees the counter reset.
  next_.store((generation & 0xffffffffu) << 32, std::memory_order_seq_cst);
  invoke_.store(invoke, std::memory_order_relaxed);
  ctx_.store(ctx, std::memory_order_relaxed);
  num_tasks_.store(num_tasks, std::memory_order_seq_cst);
  done_.store(0, std::memory_order_relaxed);
  generation_.store(generation, std::memory_order_release);  // publishes the job
  generation_.notify_all();
  DrainTasks(generation, 0);
  // Only tasks that were claimed are waited for: every claim of this job completes.
  while (done_.load(std::memory_order_acquire) != num_tasks) CpuRelax();
}

void ThreadPool::WorkerLoop(int thread) {
  uint64_t seen = 0;
  for (;;) {
    uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < kSpinRounds; ++spin) {
      CpuRelax();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      generation_.wait(seen, std::memory_order_acquire);
      continue;
    }
    seen = gen;
    if (stop_.load(std::memory_order_acquire)) return;
    DrainTasks(gen, thread);
  }
}

}  // namespace dsmoe
