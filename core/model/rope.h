// Rotary position embedding tables, built once per runner and shared by the CPU and GPU forward
// passes (the GPU runner uploads them): cos and sin of position · inv_freq, [max_context,
// head_dim / 2] each. HF's DeepseekRotaryEmbedding: inv_freq[i] = rope_theta^(−2i / head_dim);
// LinearScalingRotaryEmbedding divides the position by rope_scaling.factor. Computed in double
// and rounded once, so the tables are as exact as fp32 allows.
#pragma once

#include <cstdint>
#include <span>

#include "core/model/config.h"
#include "core/tensor/tensor.h"

namespace dsmoe {

// Const after construction; thread-safe to read.
class RopeTable {
 public:
  RopeTable(const ModelConfig& config, int64_t max_context);

  int64_t head_dim() const { return head_dim_; }
  int64_t max_context() const { return max_context_; }
  // [max_context, head_dim / 2], row p for position p.
  std::span<const float> cos() const { return {cos_.data(), cos_.size()}; }
  std::span<const float> sin() const { return {sin_.data(), sin_.size()}; }

  // Rotates x [T, num_heads, head_dim] in place, token t at positions[t] (HF rotate_half: the
  // head's first half pairs with its second half). REQUIRES: positions in [0, max_context).
  void Apply(float* x, int64_t T, int64_t num_heads, std::span<const int32_t> positions) const;

 private:
  int64_t head_dim_, max_context_;
  FloatBuffer cos_, sin_;
};

}  // namespace dsmoe
