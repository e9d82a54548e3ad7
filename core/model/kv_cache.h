// The key/value cache: for every layer and sequence slot, post-RoPE keys and values of each
// position, fp32, laid out [position][kv_head][head_dim] so one position is one contiguous row.
//
// Thread-compatible: owned by one ModelRunner, written and read inside its Forward.
#pragma once

#include <cstdint>

#include "core/model/config.h"
#include "core/tensor/tensor.h"

namespace dsmoe {

class KvCache {
 public:
  KvCache(const ModelConfig& config, int64_t num_slots, int64_t max_context);

  int64_t num_slots() const { return num_slots_; }
  int64_t max_context() const { return max_context_; }
  int64_t row_size() const { return row_size_; }  // num_key_value_heads · head_dim
  size_t NumBytes() const { return keys_.size() * sizeof(float) * 2; }

  // Row of position 0 for (layer, slot); position p is p · row_size() further.
  float* Keys(int64_t layer, int64_t slot) { return keys_.data() + Offset(layer, slot); }
  float* Values(int64_t layer, int64_t slot) { return values_.data() + Offset(layer, slot); }

 private:
  size_t Offset(int64_t layer, int64_t slot) const {
    return static_cast<size_t>((layer * num_slots_ + slot) * max_context_ * row_size_);
  }
  int64_t num_slots_, max_context_, row_size_;
  FloatBuffer keys_, values_;
};

}  // namespace dsmoe
