#include "core/model/kv_cache.h"

#include <cstring>

namespace dsmoe {

int64_t KvBytesPerToken(const ModelConfig& config, int64_t element_bytes) {
  return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim() *
         element_bytes;
}

absl::StatusOr<int64_t> NumKvPages(const ModelConfig& config, const BatchLimits& limits,
                                   int64_t element_bytes) {
  const int64_t page = limits.kv_page_tokens;
  if (limits.kv_cache_bytes <= 0) {
    return limits.num_slots * ((limits.max_context + page - 1) / page);
  }
  const int64_t page_bytes = KvBytesPerToken(config, element_bytes) * page;
  const int64_t pages = limits.kv_cache_bytes / page_bytes;
  if (pages < 1) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache budget of ", limits.kv_cache_bytes,
                                                   " bytes holds no page of ", page, " positions (",
                                                   page_bytes, " bytes for this model)"));
  }
  if (pages > INT32_MAX) return absl::InvalidArgumentError("KV cache: too many pages");
  return pages;
}

KvCache::KvCache(const ModelConfig& config, const BatchLimits& limits, int64_t num_pages)
    : row_size_(config.num_key_value_heads * config.head_dim()),
      head_dim_(config.head_dim()),
      page_floats_(limits.kv_page_tokens * row_size_),
      layer_floats_(num_pages * page_floats_),
      blocks_(num_pages, limits.kv_page_tokens, limits.num_slots, limits.max_context) {
  const size_t n = static_cast<size_t>(config.num_hidden_layers * layer_floats_);
  keys_.Resize(n);
  values_.Resize(n);
}

float* KvCache::KeyRow(int64_t layer, int32_t slot, int64_t position) {
  const int64_t page = blocks_.Table(slot)[position >> blocks_.page_shift()];
  const int64_t row = position & (blocks_.page_tokens() - 1);
  return keys_.data() + layer * layer_floats_ + page * page_floats_ + row * row_size_;
}

void KvCache::Write(int64_t layer, const ForwardBatch& b, const float* k, const float* v) {
  const int64_t T = static_cast<int64_t>(b.token_ids.size());
  for (int64_t t = 0; t < T; ++t) {  // the cache holds post-RoPE keys
    float* key = KeyRow(layer, b.slots[t], b.positions[t]);
    float* value = values_.data() + (key - keys_.data());  // the same offset in the values
    std::memcpy(key, k + t * row_size_, sizeof(float) * row_size_);
    std::memcpy(value, v + t * row_size_, sizeof(float) * row_size_);
  }
}

ops::KvPages KvCache::View(int64_t layer, int32_t slot, int64_t kv_head) const {
  const int64_t offset = layer * layer_floats_ + kv_head * head_dim_;
  ops::KvPages view;
  view.keys = keys_.data() + offset;
  view.values = values_.data() + offset;
  view.stride = row_size_;
  view.pages = blocks_.Table(slot);
  view.page_shift = blocks_.page_shift();
  view.page_stride = page_floats_;
  return view;
}

}  // namespace dsmoe
