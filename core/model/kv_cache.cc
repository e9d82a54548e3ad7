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

KvDType ResolveKvDType(KvDType requested, const ModelWeights& weights) {
  // The query projection is on every attention side; a checkpoint stores its matrices alike.
  const DType stored = weights.layers.empty() ? weights.embed_tokens.dtype
                                              : weights.layers[0].attention.q.weight.dtype;
  return ResolveKvDType(requested, stored);
}

KvCache::KvCache(const ModelConfig& config, const BatchLimits& limits, int64_t num_pages)
    : dtype_(limits.kv_dtype),
      elem_(KvElementBytes(limits.kv_dtype)),
      layers_(config.num_hidden_layers),
      row_size_(config.num_key_value_heads * config.head_dim()),
      head_dim_(config.head_dim()),
      head_block_(limits.kv_page_tokens * head_dim_),
      page_elements_(limits.kv_page_tokens * row_size_),
      layer_elements_(num_pages * page_elements_),
      blocks_(num_pages, limits.kv_page_tokens, limits.num_slots, limits.max_context) {
  const size_t bytes = static_cast<size_t>(layers_ * layer_elements_ * elem_);
  keys_.Resize((bytes + 3) / 4);
  values_.Resize((bytes + 3) / 4);
}

int64_t KvCache::RowOffset(int64_t layer, int32_t slot, int64_t position) const {
  const int64_t page = blocks_.Table(slot)[position >> blocks_.page_shift()];
  const int64_t row = position & (blocks_.page_tokens() - 1);
  return layer * layer_elements_ + page * page_elements_ + row * head_dim_;
}

void KvCache::Write(int64_t layer, const ForwardBatch& b, const float* k, const float* v) {
  const int64_t T = static_cast<int64_t>(b.token_ids.size());
  for (int64_t t = 0; t < T; ++t) {  // the cache holds post-RoPE keys
    const int64_t first = RowOffset(layer, b.slots[t], b.positions[t]);
    for (int64_t h = 0; h < row_size_ / head_dim_; ++h) {  // each kv head's block of the page
      const int64_t offset = first + h * head_block_;
      const float* key = k + t * row_size_ + h * head_dim_;
      const float* value = v + t * row_size_ + h * head_dim_;
      if (dtype_ == KvDType::kBF16) {
        uint16_t* key_row = reinterpret_cast<uint16_t*>(keys_.data()) + offset;
        uint16_t* value_row = reinterpret_cast<uint16_t*>(values_.data()) + offset;
        for (int64_t i = 0; i < head_dim_; ++i) {
          key_row[i] = F32ToBf16(key[i]);
          value_row[i] = F32ToBf16(value[i]);
        }
      } else {
        std::memcpy(keys_.data() + offset, key, sizeof(float) * head_dim_);
        std::memcpy(values_.data() + offset, value, sizeof(float) * head_dim_);
      }
    }
  }
}

ops::KvPages KvCache::View(int64_t layer, int32_t slot, int64_t kv_head) const {
  const int64_t offset = (layer * layer_elements_ + kv_head * head_block_) * elem_;  // bytes
  ops::KvPages view;
  view.keys = reinterpret_cast<const char*>(keys_.data()) + offset;
  view.values = reinterpret_cast<const char*>(values_.data()) + offset;
  view.stride = head_dim_;
  view.pages = blocks_.Table(slot);
  view.page_shift = blocks_.page_shift();
  view.page_stride = page_elements_;
  view.dtype = KvStorageDType(dtype_);
  return view;
}

}  // namespace dsmoe
