// The decode loop allocates nothing: a decode step (Forward of one token per sequence, then
// sampling) is run with every global operator new counted. Its own binary, since replacing
// operator new is program-wide.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <numeric>

#include "core/model/model_runner.h"
#include "core/model/sampler.h"
#include "tests/test_util.h"

namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
}  // namespace

void* operator new(size_t n) {
  if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](size_t n) { return operator new(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }

namespace dsmoe {
namespace {

TEST(DecodeLoop, AllocatesNothing) {
  testing::TempDir dir;
  testing::WriteTinyModel(dir.path(), DType::kBF16);
  auto weights = ModelWeights::Load(dir.path());
  ASSERT_TRUE(weights.ok());
  ThreadPool pool(2);
  RunnerOptions options;
  options.num_slots = 2;
  options.max_context = 64;
  auto runner = ModelRunner::Create(**weights, pool, options);
  ASSERT_TRUE(runner.ok());
  const int64_t V = (*weights)->config().vocab_size;
  std::vector<float> logits(2 * V);
  std::vector<int32_t> ids = {3, 4, 5, 6}, slots = {0, 0, 1, 1}, pos = {0, 1, 0, 1}, rows = {1, 3};
  ASSERT_TRUE((*runner)->Forward({ids, slots, pos, rows}, logits.data()).ok());  // prefill both

  Sampler greedy(V, {}), sampled(V, {0.9, 50, 0.9, 1}), nucleus(V, {0.8, 0, 0.95, 2});
  // The draws' scratch is per thread, sized on the thread's first draw (not per sequence).
  (void)sampled.Sample(logits.data() + V);
  (void)nucleus.Sample(logits.data() + V);
  std::vector<int32_t> step_ids(2), step_slots = {0, 1}, step_pos = {2, 2}, step_rows = {0, 1};
  counting = true;
  for (int step = 0; step < 20; ++step) {
    step_ids[0] = greedy.Sample(logits.data());
    step_ids[1] = (step % 2 ? sampled : nucleus).Sample(logits.data() + V);
    const absl::Status s =
        (*runner)->Forward({step_ids, step_slots, step_pos, step_rows}, logits.data());
    if (!s.ok()) break;
    ++step_pos[0];
    ++step_pos[1];
  }
  counting = false;
  EXPECT_EQ(allocations.load(), 0) << "heap allocations during 20 decode steps";
  EXPECT_EQ(step_pos[0], 22);
}

}  // namespace
}  // namespace dsmoe
