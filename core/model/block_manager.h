// The KV cache's pages, as bookkeeping: a pool of `num_pages` pages of `page_tokens` positions
// each, and for every sequence slot a block table mapping its positions to pages. A slot holds
// only the pages its sequence has reached (position p lives in page table[p / page_tokens] at
// row p % page_tokens) and gives them back on Release, so the pool is sized by a memory budget
// for the tokens actually held, not num_slots × max_context. Storage is elsewhere (the CPU
// KvCache, the GPU's PagedKvCache); both use this one allocator and its tables.
//
// Thread-compatible: owned by one runner, used by its owner thread (the scheduler's loop grows
// slots before a forward pass; Forward reserves what is still missing).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "core/util/status.h"

namespace dsmoe {

class BlockManager {
 public:
  // REQUIRES: num_slots, max_context > 0; page_tokens a power of two (the CPU kernels find a
  // position's page with a shift); num_pages >= 0.
  BlockManager(int64_t num_pages, int64_t page_tokens, int64_t num_slots, int64_t max_context);

  int64_t num_pages() const { return num_pages_; }
  int64_t num_free_pages() const { return static_cast<int64_t>(free_pages_.size()); }
  int64_t num_used_pages() const { return num_pages_ - num_free_pages(); }
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
  // Gives the slot pages for positions [0, tokens). RESOURCE_EXHAUSTED, taking nothing, when
  // fewer pages are free than it needs; OUT_OF_RANGE past max_context.
  absl::Status Grow(int32_t slot, int64_t tokens);
  // Grow for every slot of a batch to its highest position + 1: all or nothing.
  absl::Status Reserve(std::span<const int32_t> slots, std::span<const int32_t> positions);
  // Returns the slot's pages to the pool (its sequence finished or was preempted).
  void Release(int32_t slot);

  // The slot's block table: pages_per_slot() entries, -1 past Capacity.
  const int32_t* Table(int32_t slot) const { return table_.data() + slot * pages_per_slot_; }
  // Every slot's table, [num_slots][pages_per_slot] (what a device mirrors).
  std::span<const int32_t> tables() const { return table_; }
  // Entries [begin, end) of tables() changed since the last call (begin >= end: none).
  std::pair<int64_t, int64_t> TakeDirty();

 private:
  int64_t num_pages_, page_tokens_, num_slots_, pages_per_slot_;
  int page_shift_ = 0;
  std::vector<int32_t> table_;       // [num_slots][pages_per_slot], -1: none
  std::vector<int64_t> held_;        // pages per slot: its table's first held_[s] entries
  std::vector<int32_t> free_pages_;  // popped from the back: lowest page first
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
