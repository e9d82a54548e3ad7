#include "core/model/kv_cache.h"

namespace dsmoe {

KvCache::KvCache(const ModelConfig& config, int64_t num_slots, int64_t max_context)
    : num_slots_(num_slots),
      max_context_(max_context),
      row_size_(config.num_key_value_heads * config.head_dim()) {
  const size_t n =
      static_cast<size_t>(config.num_hidden_layers * num_slots * max_context * row_size_);
  keys_.Resize(n);
  values_.Resize(n);
}

}  // namespace dsmoe
