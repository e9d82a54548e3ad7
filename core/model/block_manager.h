// The KV cache's pages, as bookkeeping: a pool of `num_pages` pages of `page_tokens` positions
// each, and for every sequence slot a block table mapping its positions to pages. A slot holds
// only the pages its sequence has reached (position p lives in page table[p / page_tokens] at
// row p % page_tokens) and gives them back on Release, so the pool is sized by a memory budget
// for the tokens actually held, not num_slots × max_context. Storage is elsewhere (the CPU
// KvCache, the GPU's PagedKvCache); both use this one allocator and its tables.
//
// Automatic prefix caching. A page is shared by reference: several block tables may point at
// one page, which counts its holders. When a sequence has written a page's last position the
// page is full and can be committed (CommitPage): it enters the prefix index under the hash of
// its whole token prefix, hash(previous page's hash, this page's tokens). A new sequence finds
// the longest run of committed pages matching its tokens (FindCachedPrefix) and takes them
// (AttachPrefix) instead of computing their keys and values again. A committed page is never
// written again: its positions are below the writing sequence's own, and every later holder
// attached it whole. When its last holder lets go, a committed page stays cached, unreferenced,
// in LRU order; it is evicted (forgotten, and reused) only when a page is needed and no free one
// is left, so num_free_pages() counts both.
//
// A hit never relies on the hash alone (a 64-bit hash can collide): each indexed page keeps its
// tokens and the page (and that page's index generation) that preceded it when it was
// committed, and a candidate matches only when its tokens equal the sequence's and its parent
// is the page matched for the previous page. By induction from the first page, a matched page
// holds the keys and values of exactly the sequence's prefix. A page's generation changes when
// it leaves the index, so a page committed after a since-evicted parent never matches again.
// Keys and values depend on the token prefix only (one model, one KV dtype per pool); when the
// model's function changes (e.g. device-limited routing), ClearPrefixCache forgets every prefix.
//
// Thread-compatible: owned by one runner, used by its owner thread (the scheduler's loop grows
// slots before a forward pass; Forward reserves what is still missing).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/util/status.h"

namespace dsmoe {

// The longest cached prefix of some tokens, as FindCachedPrefix found it.
struct CachedPrefix {
  std::vector<int32_t> pages;  // in position order; the prefix is pages.size() whole pages
  int64_t tokens = 0;          // pages.size() · page_tokens
  int64_t unreferenced = 0;    // of `pages`, those held by nobody (counted free until attached)
};

class BlockManager {
 public:
  // REQUIRES: num_slots, max_context > 0; page_tokens a power of two (the CPU kernels find a
  // position's page with a shift); num_pages >= 0.
  BlockManager(int64_t num_pages, int64_t page_tokens, int64_t num_slots, int64_t max_context);

  int64_t num_pages() const { return num_pages_; }
  // Pages a slot can take: never used, or cached but held by nobody (evicted when taken).
  int64_t num_free_pages() const {
    return static_cast<int64_t>(free_pages_.size()) + num_unreferenced_cached_;
  }
  int64_t num_used_pages() const { return num_pages_ - num_free_pages(); }  // held by slots
  int64_t num_cached_pages() const { return num_cached_; }                  // in the prefix index
  int64_t page_tokens() const { return page_tokens_; }
  int page_shift() const { return page_shift_; }  // log2(page_tokens)
  int64_t num_slots() const { return num_slots_; }
  int64_t pages_per_slot() const { return pages_per_slot_; }  // block-table width
  // Pages for `tokens` positions of one sequence.
  int64_t PagesFor(int64_t tokens) const { return (tokens + page_tokens_ - 1) >> page_shift_; }

  // Positions the slot's pages can hold (a multiple of page_tokens).
  int64_t Capacity(int32_t slot) const { return held_[slot] * page_tokens_; }
  // Pages the slot must still take to hold positions [0, tokens).
  int64_t PagesNeeded(int32_t slot, int64_t tokens) const;
  // Gives the slot pages for positions [0, tokens), free ones first, then the least recently
  // used unreferenced cached ones. RESOURCE_EXHAUSTED, taking nothing, when fewer pages are
  // free than it needs; OUT_OF_RANGE past max_context.
  absl::Status Grow(int32_t slot, int64_t tokens);
  // Grow for every slot of a batch to its highest position + 1: all or nothing.
  absl::Status Reserve(std::span<const int32_t> slots, std::span<const int32_t> positions);
  // Lets go of the slot's pages (its sequence finished, was cancelled or preempted): a page
  // nobody else holds goes back to the pool, or, if committed, stays cached as the most
  // recently used (the slot's first page most recent: a prefix is evicted from its end).
  void Release(int32_t slot);

  // The longest prefix of `tokens`, in whole pages and at most `max_tokens` tokens, that is
  // cached. Changes nothing (not even LRU order).
  CachedPrefix FindCachedPrefix(std::span<const int32_t> tokens, int64_t max_tokens) const;
  // Gives the slot, which must hold no pages, the prefix's pages (one more holder each); the
  // slot then holds prefix.tokens positions, already written. REQUIRES: `prefix` from
  // FindCachedPrefix with no call but const ones since.
  void AttachPrefix(int32_t slot, const CachedPrefix& prefix);
  // Pages of the slot committed (or attached): its first committed_pages() pages.
  int64_t committed_pages(int32_t slot) const { return committed_[slot]; }
  // The slot's sequence has written every position of its next uncommitted page, whose
  // tokens are `tokens` (page_tokens of them): the page becomes cacheable. If another page
  // already caches the same prefix, this one stays private (and is freed on Release).
  // REQUIRES: committed_pages(slot) < the pages the slot holds.
  void CommitPage(int32_t slot, std::span<const int32_t> tokens);
  // Forgets every cached prefix: unreferenced cached pages become free, held ones private.
  // For when the keys and values of a prefix would no longer be what they were.
  void ClearPrefixCache();

  // The slot's block table: pages_per_slot() entries, -1 past Capacity.
  const int32_t* Table(int32_t slot) const { return table_.data() + slot * pages_per_slot_; }
  // Every slot's table, [num_slots][pages_per_slot] (what a device mirrors).
  std::span<const int32_t> tables() const { return table_; }
  // Entries [begin, end) of tables() changed since the last call (begin >= end: none).
  std::pair<int64_t, int64_t> TakeDirty();

  // The hash of a page's prefix from the previous page's (0 before the first page). Only
  // narrows the search: matching compares tokens and parents (see above).
  using PrefixHash = uint64_t (*)(uint64_t previous, std::span<const int32_t> tokens);
  // Tests force collisions with a poor hash. REQUIRES: nothing cached yet.
  void set_hash_for_testing(PrefixHash hash) { hash_fn_ = hash; }

 private:
  static constexpr int32_t kNone = -1;
  // Whether indexed page `page` continues the prefix whose last page is `parent` (kNone: the
  // start) of generation `parent_gen`, with `tokens` as its own.
  bool Continues(int32_t page, int32_t parent, uint64_t parent_gen,
                 std::span<const int32_t> tokens) const;
  int32_t TakePage();             // REQUIRES: num_free_pages() > 0
  void Unindex(int32_t page);     // out of the index (and the LRU list if there)
  void LruUnlink(int32_t page);   // REQUIRES: in the list
  void LruPushMru(int32_t page);  // REQUIRES: not in the list
  void MarkDirty(int32_t slot, int64_t begin, int64_t end);

  int64_t num_pages_, page_tokens_, num_slots_, pages_per_slot_;
  int page_shift_ = 0;
  std::vector<int32_t> table_;       // [num_slots][pages_per_slot], -1: none
  std::vector<int64_t> held_;        // pages per slot: its table's first held_[s] entries
  std::vector<int32_t> free_pages_;  // held by nobody and not cached; popped from the back

  // Per page.
  std::vector<int32_t> refs_;         // block tables pointing at it
  std::vector<uint8_t> indexed_;      // in the prefix index
  std::vector<uint64_t> hash_;        // its prefix's hash, while indexed
  std::vector<uint64_t> generation_;  // bumped when it leaves the index
  std::vector<int32_t> parent_;       // the indexed page before it when committed; kNone: first
  std::vector<uint64_t> parent_gen_;  // parent's generation then
  std::vector<int32_t> tokens_;       // [num_pages][page_tokens]: its tokens, while indexed
  std::vector<int32_t> bucket_next_;  // next page in its hash bucket
  std::vector<int32_t> lru_prev_, lru_next_;  // [num_pages + 1]; num_pages is the list's head
  // The prefix index: hash buckets of pages chained through bucket_next_ (several pages may
  // share a hash: a collision, or a prefix whose parent was evicted). Sized once: committing
  // and evicting allocate nothing.
  std::vector<int32_t> buckets_;
  int64_t num_cached_ = 0;               // indexed pages
  int64_t num_unreferenced_cached_ = 0;  // indexed pages nobody holds: the LRU list
  PrefixHash hash_fn_;

  // Per slot: how far its pages are committed, and the prefix's chain so far.
  std::vector<int64_t> committed_;
  std::vector<uint64_t> chain_hash_;   // hash of the committed prefix
  std::vector<int32_t> chain_page_;    // the indexed page caching its last page; kNone
  std::vector<uint64_t> chain_gen_;    // that page's generation
  std::vector<uint8_t> chain_broken_;  // a page could not be cached: nor can any after it

  int64_t dirty_begin_ = 0, dirty_end_ = 0;
  // Reserve's per-slot ranges, sized once (at most num_slots entries): a decode step allocates
  // nothing.
  struct Want {
    int32_t slot;
    int64_t first, end;
  };
  std::vector<Want> want_;
};

}  // namespace dsmoe
