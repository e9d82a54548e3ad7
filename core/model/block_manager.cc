#include "core/model/block_manager.h"

#include <algorithm>
#include <cassert>

namespace dsmoe {
namespace {

// splitmix64's finalizer: every input bit reaches every output bit.
uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

uint64_t ChainHash(uint64_t previous, std::span<const int32_t> tokens) {
  uint64_t h = Mix(previous + 0x9e3779b97f4a7c15ULL);
  for (int32_t t : tokens) h = Mix(h ^ static_cast<uint32_t>(t));
  return h;
}

}  // namespace

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
  const size_t P = static_cast<size_t>(num_pages_);
  refs_.assign(P, 0);
  indexed_.assign(P, 0);
  hash_.assign(P, 0);
  generation_.assign(P, 0);
  parent_.assign(P, kNone);
  parent_gen_.assign(P, 0);
  tokens_.assign(P * static_cast<size_t>(page_tokens_), 0);
  bucket_next_.assign(P, kNone);
  lru_prev_.assign(P + 1, static_cast<int32_t>(num_pages_));
  lru_next_.assign(P + 1, static_cast<int32_t>(num_pages_));
  size_t buckets = 1;
  while (buckets < P) buckets <<= 1;
  buckets_.assign(buckets, kNone);
  hash_fn_ = &ChainHash;
  const size_t S = static_cast<size_t>(num_slots_);
  committed_.assign(S, 0);
  chain_hash_.assign(S, 0);
  chain_page_.assign(S, kNone);
  chain_gen_.assign(S, 0);
  chain_broken_.assign(S, 0);
  dirty_begin_ = 0;
  dirty_end_ = static_cast<int64_t>(table_.size());
  want_.reserve(S);
}

int64_t BlockManager::PagesNeeded(int32_t slot, int64_t tokens) const {
  return std::max<int64_t>(0, PagesFor(tokens) - held_[slot]);
}

void BlockManager::MarkDirty(int32_t slot, int64_t begin, int64_t end) {
  const int64_t first = slot * pages_per_slot_;
  dirty_begin_ = std::min(dirty_begin_, first + begin);
  dirty_end_ = std::max(dirty_end_, first + end);
}

void BlockManager::LruUnlink(int32_t page) {
  lru_next_[lru_prev_[page]] = lru_next_[page];
  lru_prev_[lru_next_[page]] = lru_prev_[page];
  --num_unreferenced_cached_;
}

void BlockManager::LruPushMru(int32_t page) {
  const int32_t head = static_cast<int32_t>(num_pages_);
  const int32_t last = lru_prev_[head];
  lru_prev_[page] = last;
  lru_next_[page] = head;
  lru_next_[last] = page;
  lru_prev_[head] = page;
  ++num_unreferenced_cached_;
}

void BlockManager::Unindex(int32_t page) {
  int32_t* link = &buckets_[hash_[page] & (buckets_.size() - 1)];
  while (*link != page) link = &bucket_next_[*link];
  *link = bucket_next_[page];
  bucket_next_[page] = kNone;
  indexed_[page] = 0;
  ++generation_[page];
  --num_cached_;
  if (refs_[page] == 0) LruUnlink(page);
}

int32_t BlockManager::TakePage() {
  int32_t page;
  if (!free_pages_.empty()) {
    page = free_pages_.back();
    free_pages_.pop_back();
  } else {
    // Evict the least recently used cached page nobody holds.
    page = lru_next_[num_pages_];
    assert(page != num_pages_);
    Unindex(page);
  }
  refs_[page] = 1;
  return page;
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
  for (int64_t i = held_[slot]; i < want; ++i) row[i] = TakePage();
  MarkDirty(slot, held_[slot], want);
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
    // Committed pages are shared (or may be): nobody writes them again.
    if (w.first < committed_[w.slot] * page_tokens_) {
      return absl::InvalidArgumentError(
          absl::StrCat("slot ", w.slot, " position ", w.first, " lies in a committed page (",
                       committed_[w.slot], " of ", page_tokens_, " positions)"));
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
  if (slot < 0 || slot >= num_slots_) return;
  int32_t* row = table_.data() + slot * pages_per_slot_;
  // From the last page to the first: free pages are popped from the back, so the slot's first
  // page is handed out first again; cached ones are pushed as most recent, so the first page
  // is evicted last (a later prefix is useless without it).
  for (int64_t i = held_[slot] - 1; i >= 0; --i) {
    const int32_t page = row[i];
    row[i] = -1;
    if (--refs_[page] > 0) continue;
    if (indexed_[page]) {
      LruPushMru(page);
    } else {
      free_pages_.push_back(page);
    }
  }
  MarkDirty(slot, 0, held_[slot]);
  held_[slot] = 0;
  committed_[slot] = 0;
  chain_hash_[slot] = 0;
  chain_page_[slot] = kNone;
  chain_gen_[slot] = 0;
  chain_broken_[slot] = 0;
}

bool BlockManager::Continues(int32_t page, int32_t parent, uint64_t parent_gen,
                             std::span<const int32_t> tokens) const {
  if (!indexed_[page] || parent_[page] != parent) return false;
  if (parent != kNone && parent_gen_[page] != parent_gen) return false;
  const int32_t* own = tokens_.data() + static_cast<size_t>(page) * page_tokens_;
  return std::equal(tokens.begin(), tokens.end(), own);
}

CachedPrefix BlockManager::FindCachedPrefix(std::span<const int32_t> tokens,
                                            int64_t max_tokens) const {
  CachedPrefix found;
  const int64_t limit = std::min<int64_t>(static_cast<int64_t>(tokens.size()), max_tokens);
  const int64_t pages = std::max<int64_t>(0, limit) >> page_shift_;
  uint64_t hash = 0, parent_gen = 0;
  int32_t parent = kNone;
  for (int64_t i = 0; i < pages; ++i) {
    const auto own =
        tokens.subspan(static_cast<size_t>(i * page_tokens_), static_cast<size_t>(page_tokens_));
    hash = hash_fn_(hash, own);
    int32_t match = buckets_.empty() ? kNone : buckets_[hash & (buckets_.size() - 1)];
    while (match != kNone && !(hash_[match] == hash && Continues(match, parent, parent_gen, own)))
      match = bucket_next_[match];
    if (match == kNone) break;
    found.pages.push_back(match);
    if (refs_[match] == 0) ++found.unreferenced;
    parent = match;
    parent_gen = generation_[match];
  }
  found.tokens = static_cast<int64_t>(found.pages.size()) * page_tokens_;
  return found;
}

void BlockManager::AttachPrefix(int32_t slot, const CachedPrefix& prefix) {
  assert(held_[slot] == 0);
  int32_t* row = table_.data() + slot * pages_per_slot_;
  uint64_t hash = 0;
  for (size_t i = 0; i < prefix.pages.size(); ++i) {
    const int32_t page = prefix.pages[i];
    assert(indexed_[page]);
    if (refs_[page]++ == 0) LruUnlink(page);
    row[i] = page;
    hash = hash_[page];
  }
  const int64_t n = static_cast<int64_t>(prefix.pages.size());
  MarkDirty(slot, 0, n);
  held_[slot] = n;
  committed_[slot] = n;
  chain_hash_[slot] = hash;
  chain_page_[slot] = n > 0 ? prefix.pages.back() : kNone;
  chain_gen_[slot] = n > 0 ? generation_[prefix.pages.back()] : 0;
  chain_broken_[slot] = 0;
}

void BlockManager::CommitPage(int32_t slot, std::span<const int32_t> tokens) {
  const int64_t i = committed_[slot]++;
  assert(i < held_[slot] && static_cast<int64_t>(tokens.size()) == page_tokens_);
  if (chain_broken_[slot]) return;
  const int32_t page = table_[slot * pages_per_slot_ + i];
  const int32_t parent = chain_page_[slot];
  const uint64_t parent_gen = chain_gen_[slot];
  const uint64_t hash = hash_fn_(chain_hash_[slot], tokens);
  chain_hash_[slot] = hash;
  int32_t* bucket = &buckets_[hash & (buckets_.size() - 1)];
  for (int32_t c = *bucket; c != kNone; c = bucket_next_[c]) {
    if (hash_[c] == hash && Continues(c, parent, parent_gen, tokens)) {
      // The same prefix is cached already (two sequences computed it at once): this page stays
      // private; the slot's later pages continue the cached one's chain.
      chain_page_[slot] = c;
      chain_gen_[slot] = generation_[c];
      return;
    }
  }
  indexed_[page] = 1;
  hash_[page] = hash;
  parent_[page] = parent;
  parent_gen_[page] = parent_gen;
  std::copy(tokens.begin(), tokens.end(),
            tokens_.begin() + static_cast<ptrdiff_t>(page) * page_tokens_);
  bucket_next_[page] = *bucket;
  *bucket = page;
  ++num_cached_;
  chain_page_[slot] = page;
  chain_gen_[slot] = generation_[page];
}

void BlockManager::ClearPrefixCache() {
  for (int32_t page = 0; page < num_pages_; ++page) {
    if (!indexed_[page]) continue;
    const bool unreferenced = refs_[page] == 0;
    Unindex(page);
    if (unreferenced) free_pages_.push_back(page);
  }
  // A sequence's pages so far are private now, and nothing after them can be cached.
  for (int64_t s = 0; s < num_slots_; ++s) {
    if (committed_[s] > 0) chain_broken_[s] = 1;
  }
}

std::pair<int64_t, int64_t> BlockManager::TakeDirty() {
  const std::pair<int64_t, int64_t> range{dirty_begin_, dirty_end_};
  dirty_begin_ = static_cast<int64_t>(table_.size());
  dirty_end_ = 0;
  return range;
}

}  // namespace dsmoe
