#include "core/util/thread_pool.h"

#include <gtest/gtest.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <thread>

#include "core/util/cpu_quota.h"

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

namespace dsmoe {
namespace {

TEST(UsableCpus, CgroupQuotasRoundDownToWholeCpus) {
  EXPECT_EQ(CpusFromCgroupV2CpuMax("max 100000\n"), 0);  // no quota
  EXPECT_EQ(CpusFromCgroupV2CpuMax("400000 100000\n"), 4);
  EXPECT_EQ(CpusFromCgroupV2CpuMax("150000 100000"), 1);  // 1.5 CPUs: 2 threads would throttle
  EXPECT_EQ(CpusFromCgroupV2CpuMax("50000 100000"), 1);   // at least one
  EXPECT_EQ(CpusFromCgroupV2CpuMax("garbage"), 0);
  EXPECT_EQ(CpusFromCgroupV1Quota(-1, 100000), 0);
  EXPECT_EQ(CpusFromCgroupV1Quota(800000, 100000), 8);
}

TEST(UsableCpus, ThePoolsDefaultFollowsTheAffinityMask) {
  cpu_set_t saved;
  ASSERT_EQ(sched_getaffinity(0, sizeof(saved), &saved), 0);
  cpu_set_t one;
  CPU_ZERO(&one);
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &saved)) {
      CPU_SET(c, &one);
      break;
    }
  }
  ASSERT_EQ(sched_setaffinity(0, sizeof(one), &one), 0);
  const int usable = UsableCpus();
  const int pool_threads = ThreadPool().num_threads();
  ASSERT_EQ(sched_setaffinity(0, sizeof(saved), &saved), 0);
  EXPECT_EQ(usable, 1);
  EXPECT_EQ(pool_threads, 1);
  EXPECT_LE(UsableCpus(), CPU_COUNT(&saved));
}

}  // namespace
}  // namespace dsmoe
