// The paged KV cache: the BlockManager's bookkeeping against hand-counted pages, and a runner
// whose sequences' pages are scattered through a small pool against a runner that recomputes
// each sequence alone from scratch.
#include "core/model/kv_cache.h"

#include <gtest/gtest.h>

#include <numeric>

#include "core/model/block_manager.h"
#include "core/model/model_runner.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

TEST(BlockManager, SlotsTakeOnlyThePagesTheyReachAndGiveThemBack) {
  BlockManager b(/*num_pages=*/10, /*page_tokens=*/4, /*num_slots=*/3, /*max_context=*/32);
  EXPECT_EQ(b.pages_per_slot(), 8);
  EXPECT_EQ(b.PagesFor(0), 0);
  EXPECT_EQ(b.PagesFor(1), 1);
  EXPECT_EQ(b.PagesFor(4), 1);
  EXPECT_EQ(b.PagesFor(5), 2);
  ASSERT_TRUE(b.Grow(0, 5).ok());  // 2 pages
  EXPECT_EQ(b.Capacity(0), 8);
  EXPECT_EQ(b.num_free_pages(), 8);
  ASSERT_TRUE(b.Grow(0, 8).ok());  // still 2
  EXPECT_EQ(b.num_free_pages(), 8);
  EXPECT_EQ(b.PagesNeeded(1, 30), 8);
  ASSERT_TRUE(b.Grow(1, 30).ok());  // 8 pages: the pool is empty
  EXPECT_EQ(b.num_free_pages(), 0);
  // No page is held twice.
  std::vector<int32_t> seen;
  for (int32_t s : {0, 1}) {
    for (int64_t i = 0; i < b.pages_per_slot() && b.Table(s)[i] >= 0; ++i)
      seen.push_back(b.Table(s)[i]);
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_EQ(seen, std::vector<int32_t>({0, 1, 2, 3, 4, 5, 6, 7, 8, 9}));
  EXPECT_EQ(b.Table(0)[2], -1);
  // Exhausted: refused, nothing taken.
  const absl::Status s = b.Grow(2, 1);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(b.Capacity(2), 0);
  b.Release(1);
  EXPECT_EQ(b.num_free_pages(), 8);
  EXPECT_EQ(b.Table(1)[0], -1);
  ASSERT_TRUE(b.Grow(2, 1).ok());
  EXPECT_EQ(b.Grow(2, 33).code(), absl::StatusCode::kOutOfRange);
}

TEST(BlockManager, ReserveIsAllOrNothingAndRefusesSkippedPositions) {
  BlockManager b(4, 4, 2, 64);
  // Slot 0 positions 0..9 (3 pages) and slot 1 positions 0..5 (2 pages): 5 > 4 pages.
  std::vector<int32_t> slots, pos;
  for (int p = 0; p < 10; ++p) slots.push_back(0), pos.push_back(p);
  for (int p = 0; p < 6; ++p) slots.push_back(1), pos.push_back(p);
  EXPECT_EQ(b.Reserve(slots, pos).code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(b.num_free_pages(), 4);
  EXPECT_EQ(b.Capacity(0), 0);
  ASSERT_TRUE(b.Reserve(std::span(slots).first(10), std::span(pos).first(10)).ok());
  EXPECT_EQ(b.Capacity(0), 12);
  // A token past the slot's pages with nothing written before it.
  const std::vector<int32_t> one = {1}, far = {9};
  EXPECT_EQ(b.Reserve(one, far).code(), absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> zero = {0}, next = {12};
  ASSERT_TRUE(b.Reserve(zero, next).ok());  // decode into a new page
  EXPECT_EQ(b.num_free_pages(), 0);
}

TEST(BlockManager, DirtyRangeCoversEveryChangedEntry) {
  BlockManager b(8, 2, 3, 8);  // tables of 4 entries per slot
  b.TakeDirty();
  auto [begin, end] = b.TakeDirty();
  EXPECT_GE(begin, end);
  ASSERT_TRUE(b.Grow(1, 3).ok());  // entries 4, 5
  std::tie(begin, end) = b.TakeDirty();
  EXPECT_LE(begin, 4);
  EXPECT_GE(end, 6);
  b.Release(2);  // holds nothing: no change
  std::tie(begin, end) = b.TakeDirty();
  EXPECT_GE(begin, end);
  b.Release(1);
  std::tie(begin, end) = b.TakeDirty();
  EXPECT_LE(begin, 4);
  EXPECT_GE(end, 6);
}

TEST(KvCache, BudgetBuysPagesOfTheModelsBytesPerToken) {
  ModelConfig c;
  c.num_hidden_layers = 28;
  c.num_key_value_heads = 16;
  c.num_attention_heads = 16;
  c.hidden_size = 2048;
  // deepseek-moe-16b: 2 · 28 · 16 · 128 · 4 bytes = 448 KiB per token in fp32, half in bf16.
  EXPECT_EQ(KvBytesPerToken(c, 4), 458752);
  EXPECT_EQ(KvBytesPerToken(c, 2), 229376);
  BatchLimits l;
  l.num_slots = 32;
  l.max_context = 4096;
  l.kv_page_tokens = 16;
  EXPECT_EQ(*NumKvPages(c, l, 4), 32 * 256);  // no budget: every slot reaches max_context
  l.kv_cache_bytes = int64_t{8} << 30;
  EXPECT_EQ(*NumKvPages(c, l, 4), (int64_t{8} << 30) / (458752 * 16));
  l.kv_cache_bytes = 1000;
  EXPECT_EQ(NumKvPages(c, l, 4).status().code(), absl::StatusCode::kInvalidArgument);
}

// Two sequences decoded in turn through a pool too small for both to reach max_context, one
// slot released and reused midway so pages lie out of order: every logit equals a fresh
// runner's recomputation of the same tokens.
TEST(KvCache, ScatteredPagesGiveTheLogitsOfARecomputation) {
  testing::TempDir dir;
  testing::WriteTinyModel(dir.path(), DType::kF32);
  auto weights = *ModelWeights::Load(dir.path());
  const ModelConfig& c = weights->config();
  const int64_t V = c.vocab_size;
  ThreadPool pool(2);
  RunnerOptions o;
  o.num_slots = 2;
  o.max_context = 64;
  o.max_batch_tokens = 64;
  o.kv_page_tokens = 4;
  o.kv_cache_bytes = KvBytesPerToken(c, sizeof(float)) * 4 * 12;  // 12 pages of 4 positions
  auto paged = ModelRunner::Create(*weights, pool, o);
  ASSERT_TRUE(paged.ok()) << paged.status();
  EXPECT_EQ((*paged)->blocks().num_pages(), 12);
  RunnerOptions plain;
  plain.num_slots = 1;
  plain.max_context = 64;
  plain.max_batch_tokens = 64;
  auto fresh = ModelRunner::Create(*weights, pool, plain);
  ASSERT_TRUE(fresh.ok());

  std::vector<std::vector<int32_t>> seqs = {{3, 9, 27, 81, 243}, {7, 49}};
  auto recompute = [&](const std::vector<int32_t>& ids) {
    const int64_t T = static_cast<int64_t>(ids.size());
    std::vector<int32_t> slots(T, 0), pos(T);
    std::iota(pos.begin(), pos.end(), 0);
    const std::vector<int32_t> last = {static_cast<int32_t>(T - 1)};
    std::vector<float> logits(V);
    EXPECT_TRUE((*fresh)->Forward({ids, slots, pos, last}, logits.data()).ok());
    return logits;
  };
  auto step = [&](int32_t slot, std::vector<int32_t>& seq, int64_t first) {
    const int64_t n = static_cast<int64_t>(seq.size()) - first;
    std::vector<int32_t> slots(n, slot), pos(n);
    std::iota(pos.begin(), pos.end(), static_cast<int32_t>(first));
    const std::vector<int32_t> last = {static_cast<int32_t>(n - 1)};
    std::vector<float> logits(V);
    const absl::Status s =
        (*paged)->Forward({std::span(seq).subspan(first), slots, pos, last}, logits.data());
    EXPECT_TRUE(s.ok()) << s;
    const std::vector<float> want = recompute(seq);
    for (int64_t v = 0; v < V; ++v) ASSERT_NEAR(logits[v], want[v], 1e-5) << "vocab " << v;
    seq.push_back(
        static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
  };
  step(0, seqs[0], 0);
  step(1, seqs[1], 0);
  for (int i = 0; i < 10; ++i) {
    step(0, seqs[0], static_cast<int64_t>(seqs[0].size()) - 1);
    step(1, seqs[1], static_cast<int64_t>(seqs[1].size()) - 1);
  }
  // Slot 1 starts over with a new sequence on the pages slot 0 did not take.
  (*paged)->ReleaseSlot(1);
  seqs[1] = {11, 12, 13};
  step(1, seqs[1], 0);
  for (int i = 0; i < 10; ++i) {
    step(0, seqs[0], static_cast<int64_t>(seqs[0].size()) - 1);
    step(1, seqs[1], static_cast<int64_t>(seqs[1].size()) - 1);
  }
  // 25 + 13 positions held: 7 + 4 of the 12 pages (two slots of 64 positions would need 32).
  EXPECT_EQ((*paged)->blocks().num_free_pages(), 1);
}

}  // namespace
}  // namespace dsmoe
