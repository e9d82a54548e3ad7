// Writes random-weight checkpoints in exactly Hugging Face's format (config.json,
// generation_config.json, model.safetensors or shards + index), for tests, demos and
// benchmarks: no real weights can be downloaded where dsmoe is built.
//
// Weights are uniform with std 1/sqrt(fan_in) (so activations and logits stay O(1)), norm
// weights scatter around 1 (so a kernel that skips them is caught), embeddings have std 1.
// Each tensor's values depend only on (seed, tensor name): sharding does not change them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "core/tensor/dtype.h"
#include "core/util/status.h"

namespace dsmoe {

// Preset shapes:
//   tiny   — 4 layers, hidden 64, 4 heads, 16 routed experts of width 32 (top-4) + 2 shared,
//            first layer dense, vocab 512.
//   gshard — the paper's baseline at tiny's expert budget: top-2 of 8 experts of width 72
//            (8·72 = 16·32 + 2·32 expert units), no shared experts, every layer MoE.
//   small  — 8 layers, hidden 512, 8 heads, 64 routed of width 256 (top-6) + 2 shared, vocab 8192.
//   medium — 12 layers, hidden 1024, 16 heads, 64 routed of width 704 (top-6) + 2 shared,
//            vocab 32000: 1.7B parameters, 0.32B active per token.
absl::StatusOr<ModelConfig> PresetConfig(const std::string& name);
std::vector<std::string> PresetNames();

struct CheckpointWriteOptions {
  DType dtype = DType::kF32;
  uint64_t seed = 0;
  int num_shards = 1;
  // A skewed router, for load-balancing experiments: in every MoE layer the gate rows of these
  // routed experts are multiplied by router_bias, so their logits spread wider and they win
  // top-k far more often than the others.
  std::vector<int64_t> router_bias_experts;
  float router_bias = 1.0f;
};

// Creates `dir` if needed and writes the checkpoint there.
absl::Status WriteRandomCheckpoint(const ModelConfig& config, const CheckpointWriteOptions& options,
                                   const std::string& dir);

}  // namespace dsmoe
