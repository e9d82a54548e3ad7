#include "core/model/block_manager.h"

#include <algorithm>
#include <cassert>

namespace dsmoe {

BlockManager::BlockManager(int64_t num_pages, int64_t page_tokens, int64_t num_slots,
                           int64_t max_context)
    : num_pages_(num_pages), page_tokens_(page_tokens), num_slots_(num_slots) {
  assert(page_tokens > 0 && (page_tokens & (page_tokens - 1)) == 0);
  while ((int64_t{1} << page_shift_) < page_tokens_) ++page_shift_;
  pages_per_slot_ = PagesFor(max_context);
  table_.assign(static_cast<size_t>(num_slots_ * pages_per_slot_), -1);
  held_.assign(static_cast<size_t>(num_slots_), 0);
  free_pages_.resize(static_cast<size_t>(num_pages_));
  for (int64_t i = 0; i < num_pages_; ++i)
    free_pages_[i] = static_cast<int32_t>(num_pages_ - 1 - i);
  dirty_begin_ = 0;
  dirty_end_ = static_cast<int64_t>(table_.size());
  want_.reserve(static_cast<size_t>(num_slots_));
}

int64_t BlockManager::PagesNeeded(int32_t slot, int64_t tokens) const {
  return std::max<int64_t>(0, PagesFor(tokens) - held_[slot]);
}

absl::Status BlockManager::Grow(int32_t slot, int64_t tokens) {
  const int64_t want = PagesFor(tokens);
  if (want > pages_per_slot_) {
    return absl::OutOfRangeError(absl::StrCat("KV cache: ", tokens, " positions exceed the ",
                                              pages_per_slot_ * page_tokens_, " a slot can hold"));
  }
  const int64_t need = want - held_[slot];
  if (need <= 0) return absl::OkStatus();
  if (need > num_free_pages()) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache: slot ", slot, " needs ", need, " more pages for ", tokens,
                     " positions, ", num_free_pages(), " of ", num_pages_, " are free"));
  }
  int32_t* row = table_.data() + slot * pages_per_slot_;
  for (int64_t i = held_[slot]; i < want; ++i) {
    row[i] = free_pages_.back();
    free_pages_.pop_back();
  }
  const int64_t first = slot * pages_per_slot_;
  dirty_begin_ = std::min(dirty_begin_, first + held_[slot]);
  dirty_end_ = std::max(dirty_end_, first + want);
  held_[slot] = want;
  return absl::OkStatus();
}

absl::Status BlockManager::Reserve(std::span<const int32_t> slots,
                                   std::span<const int32_t> positions) {
  // Per slot of the batch, in order of first appearance: lowest and highest position + 1.
  std::vector<Want>& want = want_;
  want.clear();
  for (size_t t = 0; t < slots.size(); ++t) {
    auto it =
        std::find_if(want.begin(), want.end(), [&](const Want& w) { return w.slot == slots[t]; });
    if (it == want.end()) {
      want.push_back({slots[t], positions[t], positions[t] + 1});
    } else {
      it->first = std::min<int64_t>(it->first, positions[t]);
      it->end = std::max<int64_t>(it->end, positions[t] + 1);
    }
  }
  int64_t need = 0;
  for (const Want& w : want) {
    // Positions are written in order: a batch may not start past the slot's pages.
    if (w.first > Capacity(w.slot)) {
      return absl::InvalidArgumentError(absl::StrCat("slot ", w.slot, " position ", w.first,
                                                     ": earlier positions were never written"));
    }
    need += PagesNeeded(w.slot, w.end);
  }
  if (need > num_free_pages()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache: the batch needs ", need,
                                                     " more pages, ", num_free_pages(), " of ",
                                                     num_pages_, " are free"));
  }
  for (const Want& w : want) DSMOE_RETURN_IF_ERROR(Grow(w.slot, w.end));
  return absl::OkStatus();
}

void BlockManager::Release(int32_t slot) {
  if (slot < 0 || slot >= num_slots_ || held_[slot] == 0) return;
  int32_t* row = table_.data() + slot * pages_per_slot_;
  // Pushed in reverse so that the slot's first page is handed out first again.
  for (int64_t i = held_[slot] - 1; i >= 0; --i) {
    free_pages_.push_back(row[i]);
    row[i] = -1;
  }
  dirty_begin_ = std::min(dirty_begin_, slot * pages_per_slot_);
  dirty_end_ = std::max(dirty_end_, slot * pages_per_slot_ + held_[slot]);
  held_[slot] = 0;
}

std::pair<int64_t, int64_t> BlockManager::TakeDirty() {
  const std::pair<int64_t, int64_t> range{dirty_begin_, dirty_end_};
  dirty_begin_ = static_cast<int64_t>(table_.size());
  dirty_end_ = 0;
  return range;
}

}  // namespace dsmoe
