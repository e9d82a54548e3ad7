// The block manager's prefix cache, against pages counted by hand: reference counts of shared
// pages, LRU eviction order, hash chains (a page matches only after its own prefix), exact
// matching under forced hash collisions and after a parent page was evicted and reused, and
// what Release (a finished, cancelled or preempted sequence) gives back; a runner forgets the
// cache when its routing changes.
#include <gtest/gtest.h>

#include <vector>

#include "core/model/block_manager.h"
#include "core/model/model_runner.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

// The slot's first `n` table entries.
std::vector<int32_t> Pages(const BlockManager& b, int32_t slot, int64_t n) {
  return std::vector<int32_t>(b.Table(slot), b.Table(slot) + n);
}

// Commits the slot's pages up to `tokens.size()` positions (what the scheduler does after a
// forward pass wrote them).
void CommitUpTo(BlockManager& b, int32_t slot, const std::vector<int32_t>& tokens) {
  const int64_t pt = b.page_tokens();
  for (int64_t i = b.committed_pages(slot); (i + 1) * pt <= static_cast<int64_t>(tokens.size());
       ++i) {
    b.CommitPage(slot,
                 std::span(tokens).subspan(static_cast<size_t>(i * pt), static_cast<size_t>(pt)));
  }
}

// Grows an empty slot for `tokens` after attaching their cached prefix; returns the prefix.
CachedPrefix Admit(BlockManager& b, int32_t slot, const std::vector<int32_t>& tokens,
                   int64_t most) {
  CachedPrefix prefix = b.FindCachedPrefix(tokens, most);
  b.AttachPrefix(slot, prefix);
  EXPECT_TRUE(b.Grow(slot, static_cast<int64_t>(tokens.size())).ok());
  return prefix;
}

TEST(PrefixCache, SharedPagesAreCountedAndFreedByTheirLastHolder) {
  BlockManager b(/*num_pages=*/8, /*page_tokens=*/4, /*num_slots=*/3, /*max_context=*/32);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // 2 full pages + 2
  ASSERT_TRUE(b.Grow(0, 10).ok());
  const std::vector<int32_t> own0 = Pages(b, 0, 3);
  CommitUpTo(b, 0, a);
  EXPECT_EQ(b.committed_pages(0), 2);
  EXPECT_EQ(b.num_cached_pages(), 2);

  // Another sequence with the same first 9 tokens: both full pages are found, held by slot 0.
  std::vector<int32_t> c = a;
  c[9] = 99;
  const CachedPrefix hit = Admit(b, 1, c, 9);
  EXPECT_EQ(hit.tokens, 8);
  EXPECT_EQ(hit.pages, std::vector<int32_t>({own0[0], own0[1]}));
  EXPECT_EQ(hit.unreferenced, 0);
  EXPECT_EQ(b.Capacity(1), 12);
  EXPECT_EQ(b.Table(1)[0], own0[0]);
  EXPECT_EQ(b.Table(1)[1], own0[1]);
  EXPECT_NE(b.Table(1)[2], own0[2]);  // the partial page is its own
  EXPECT_EQ(b.num_used_pages(), 4);
  EXPECT_EQ(b.committed_pages(1), 2);

  // The first holder leaves (finished or cancelled): only its own page is free.
  b.Release(0);
  EXPECT_EQ(b.num_used_pages(), 3);
  EXPECT_EQ(b.num_free_pages(), 5);
  // The last leaves: the cached pages stay cached, unreferenced, and count as free.
  b.Release(1);
  EXPECT_EQ(b.num_used_pages(), 0);
  EXPECT_EQ(b.num_free_pages(), 8);
  EXPECT_EQ(b.num_cached_pages(), 2);
  const CachedPrefix again = b.FindCachedPrefix(a, 100);
  EXPECT_EQ(again.pages, hit.pages);
  EXPECT_EQ(again.unreferenced, 2);
  // Attaching them takes them out of the free count.
  b.AttachPrefix(2, again);
  EXPECT_EQ(b.num_free_pages(), 6);
  EXPECT_EQ(b.num_used_pages(), 2);
}

TEST(PrefixCache, FindStopsAtMaxTokensAndAtTheFirstMiss) {
  BlockManager b(8, 4, 2, 32);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
  ASSERT_TRUE(b.Grow(0, 12).ok());
  CommitUpTo(b, 0, a);
  EXPECT_EQ(b.FindCachedPrefix(a, 12).tokens, 12);
  // Whole pages of at most max_tokens: the scheduler computes a prompt's last token itself.
  EXPECT_EQ(b.FindCachedPrefix(a, 11).tokens, 8);
  EXPECT_EQ(b.FindCachedPrefix(a, 3).tokens, 0);
  std::vector<int32_t> mid = a;
  mid[5] = 0;  // the second page differs: the third cannot match after it
  EXPECT_EQ(b.FindCachedPrefix(mid, 12).tokens, 4);
  // The same third page after a different first page is another prefix (a hash chain).
  std::vector<int32_t> first = a;
  first[0] = 0;
  EXPECT_EQ(b.FindCachedPrefix(first, 12).tokens, 0);
  // Too few tokens for a page.
  EXPECT_EQ(b.FindCachedPrefix(std::span(a).first(3), 12).tokens, 0);
}

TEST(PrefixCache, UnreferencedPagesAreEvictedLeastRecentlyUsedFirstAndOnlyWhenNeeded) {
  BlockManager b(/*num_pages=*/4, /*page_tokens=*/2, /*num_slots=*/2, /*max_context=*/8);
  const std::vector<int32_t> x = {1, 2, 3, 4}, y = {5, 6, 7, 8};
  ASSERT_TRUE(b.Grow(0, 4).ok());
  CommitUpTo(b, 0, x);
  b.Release(0);  // x: cached, least recent
  ASSERT_TRUE(b.Grow(0, 4).ok());
  CommitUpTo(b, 0, y);
  b.Release(0);  // y: cached, most recent
  EXPECT_EQ(b.num_cached_pages(), 4);
  EXPECT_EQ(b.num_free_pages(), 4);
  // Touch x: it is now the more recent.
  Admit(b, 1, x, 4);
  b.Release(1);
  // One page: y's last page goes (a prefix is evicted from its end).
  ASSERT_TRUE(b.Grow(0, 1).ok());
  EXPECT_EQ(b.num_cached_pages(), 3);
  EXPECT_EQ(b.FindCachedPrefix(y, 4).tokens, 2);
  EXPECT_EQ(b.FindCachedPrefix(x, 4).tokens, 4);
  // The next: y's first page; x is untouched.
  ASSERT_TRUE(b.Grow(0, 3).ok());
  EXPECT_EQ(b.FindCachedPrefix(y, 4).tokens, 0);
  EXPECT_EQ(b.FindCachedPrefix(x, 4).tokens, 4);
  // Then x's, last page first. Nothing else is left: the pool is exhausted.
  ASSERT_TRUE(b.Grow(0, 5).ok());
  EXPECT_EQ(b.FindCachedPrefix(x, 4).tokens, 2);
  ASSERT_TRUE(b.Grow(0, 7).ok());
  EXPECT_EQ(b.FindCachedPrefix(x, 4).tokens, 0);
  EXPECT_EQ(b.num_cached_pages(), 0);
  EXPECT_EQ(b.Grow(1, 1).code(), absl::StatusCode::kResourceExhausted);
}

uint64_t CollidingHash(uint64_t, std::span<const int32_t>) { return 42; }

TEST(PrefixCache, EveryHashCollidingStillMatchesOnlyTheExactPrefix) {
  BlockManager b(8, 2, 3, 16);
  b.set_hash_for_testing(&CollidingHash);
  const std::vector<int32_t> a = {1, 2, 3, 4, 5, 6}, c = {1, 2, 9, 9, 5, 6}, d = {7, 7, 3, 4};
  ASSERT_TRUE(b.Grow(0, 6).ok());
  CommitUpTo(b, 0, a);
  ASSERT_TRUE(b.Grow(1, 6).ok());
  CommitUpTo(b, 1, c);  // its first page repeats a's: not cached twice
  EXPECT_EQ(b.num_cached_pages(), 5);
  EXPECT_EQ(b.FindCachedPrefix(a, 6).pages, Pages(b, 0, 3));
  const CachedPrefix in_c = b.FindCachedPrefix(c, 6);
  ASSERT_EQ(in_c.tokens, 6);
  EXPECT_EQ(in_c.pages[0], b.Table(0)[0]);  // a's first page
  EXPECT_EQ(in_c.pages[1], b.Table(1)[1]);
  EXPECT_EQ(in_c.pages[2], b.Table(1)[2]);
  // d shares a's second page's tokens after another first page: no match at all.
  EXPECT_EQ(b.FindCachedPrefix(d, 4).tokens, 0);
}

TEST(PrefixCache, APageCommittedAfterAnEvictedParentNeverMatchesItsReplacement) {
  // Every hash collides, so only the parent check keeps a stale page out.
  BlockManager b(/*num_pages=*/4, /*page_tokens=*/2, /*num_slots=*/3, /*max_context=*/8);
  b.set_hash_for_testing(&CollidingHash);
  const std::vector<int32_t> t = {1, 2, 3, 4};
  ASSERT_TRUE(b.Grow(0, 2).ok());  // page 0
  ASSERT_TRUE(b.Grow(1, 2).ok());  // page 1
  CommitUpTo(b, 0, {1, 2});
  CommitUpTo(b, 1, {1, 2});  // the same first page: slot 1 continues page 0's chain
  EXPECT_EQ(b.num_cached_pages(), 1);
  b.Release(0);  // page 0: cached, unreferenced
  ASSERT_TRUE(b.Grow(1, 4).ok());
  const int32_t second = b.Table(1)[1];
  CommitUpTo(b, 1, t);  // slot 1's second page, after page 0
  EXPECT_EQ(b.FindCachedPrefix(t, 4).pages, std::vector<int32_t>({0, second}));
  // Take the last free page, then evict page 0 and fill it with another prefix.
  ASSERT_TRUE(b.Grow(0, 2).ok());
  ASSERT_TRUE(b.Grow(2, 2).ok());
  ASSERT_EQ(b.Table(2)[0], 0);
  const std::vector<int32_t> other = {9, 9, 3, 4};
  CommitUpTo(b, 2, {9, 9});
  // Page 0 now caches {9, 9}; slot 1's second page still names page 0 as its parent, but of
  // an older generation: {9, 9, 3, 4} is found for one page, not two.
  const CachedPrefix found = b.FindCachedPrefix(other, 4);
  EXPECT_EQ(found.pages, std::vector<int32_t>({0}));
  EXPECT_EQ(b.FindCachedPrefix(t, 4).tokens, 0);
}

TEST(PrefixCache, CommittedPagesAreNeverWrittenAgain) {
  BlockManager b(4, 2, 2, 8);
  ASSERT_TRUE(b.Grow(0, 3).ok());
  CommitUpTo(b, 0, {1, 2, 3});  // positions 0..2 written: the first page is full
  EXPECT_EQ(b.committed_pages(0), 1);
  const std::vector<int32_t> slots = {0}, below = {1}, next = {2};
  EXPECT_EQ(b.Reserve(slots, below).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(b.Reserve(slots, next).ok());
}

TEST(PrefixCache, ClearForgetsEveryPrefixAndFreesUnheldPages) {
  BlockManager b(4, 2, 2, 8);
  const std::vector<int32_t> t = {1, 2, 3, 4};
  ASSERT_TRUE(b.Grow(0, 4).ok());
  CommitUpTo(b, 0, t);
  ASSERT_TRUE(b.Grow(1, 4).ok());
  CommitUpTo(b, 1, {5, 6, 7, 8});
  b.Release(1);
  EXPECT_EQ(b.num_cached_pages(), 4);
  b.ClearPrefixCache();
  EXPECT_EQ(b.num_cached_pages(), 0);
  EXPECT_EQ(b.num_free_pages(), 2);
  EXPECT_EQ(b.FindCachedPrefix(t, 4).tokens, 0);
  b.Release(0);
  EXPECT_EQ(b.num_free_pages(), 4);
  EXPECT_EQ(b.num_cached_pages(), 0);
}

// Device-limited routing changes what the MoE layers compute, and so every later layer's keys
// and values: the runner forgets every cached prefix when it changes.
TEST(PrefixCache, ARunnerForgetsCachedPrefixesWhenItsRoutingChanges) {
  testing::TempDir dir;
  testing::WriteTinyModel(dir.path(), DType::kF32);
  auto weights = ModelWeights::Load(dir.path());
  ASSERT_TRUE(weights.ok()) << weights.status();
  ThreadPool pool(1);
  RunnerOptions o;
  o.max_context = 16;
  o.kv_page_tokens = 4;
  auto runner = ModelRunner::Create(**weights, pool, o);
  ASSERT_TRUE(runner.ok()) << runner.status();
  BlockManager& b = (*runner)->blocks();
  ASSERT_TRUE(b.Grow(0, 8).ok());
  CommitUpTo(b, 0, {1, 2, 3, 4, 5, 6, 7, 8});
  EXPECT_EQ(b.num_cached_pages(), 2);
  ASSERT_TRUE((*runner)->set_device_limited_routing(nullptr).ok());
  EXPECT_EQ(b.num_cached_pages(), 0);
  EXPECT_EQ(b.FindCachedPrefix(std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8}, 8).tokens, 0);
}

}  // namespace
}  // namespace dsmoe
