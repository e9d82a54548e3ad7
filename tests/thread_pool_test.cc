#include "core/util/thread_pool.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace dsmoe {
namespace {

TEST(ThreadPool, RunsEveryTaskExactlyOnceAcrossManyLoops) {
  for (int threads : {1, 2, 3, 4}) {
    ThreadPool pool(threads);
    EXPECT_EQ(pool.num_threads(), threads);
    for (int round = 0; round < 2000; ++round) {
      const int64_t n = round % 37;
      std::vector<std::atomic<int>> hits(n);
      std::atomic<int> bad_thread{0};
      pool.ParallelFor(n, [&](int64_t task, int thread) {
        hits[task].fetch_add(1);
        if (thread < 0 || thread >= threads) bad_thread = 1;
      });
      for (int64_t i = 0; i < n; ++i)
        ASSERT_EQ(hits[i].load(), 1) << "round " << round << " task " << i;
      ASSERT_EQ(bad_thread.load(), 0);
    }
  }
}

TEST(ThreadPool, UsesMoreThanOneThreadWhenAsked) {
  // Whichever thread takes a task first waits (up to 10 s) for a task run by another thread:
  // a pool that ran everything on one thread would time out here.
  ThreadPool pool(2);
  std::atomic<int> seen_mask{0};
  pool.ParallelFor(2, [&](int64_t, int thread) {
    seen_mask |= 1 << thread;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (seen_mask.load() != 3 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::yield();
  });
  EXPECT_EQ(seen_mask.load(), 3);
}

}  // namespace
}  // namespace dsmoe
