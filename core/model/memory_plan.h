// What a CPU attention-side process will hold in memory, computed before it allocates anything:
// the weights it loads, the KV cache's pages (the budget, in pages and the tokens they hold), the
// activation buffers its runner sizes for max_batch_tokens, and a fixed allowance for the rest
// of the process. Servers log it at start-up, export it, and refuse to start when it exceeds
// their memory limit (docs/memory.md); a test checks the chart's defaults with it.
#pragma once

#include <cstdint>
#include <string>

#include "core/model/config.h"
#include "core/model/forward_batch.h"
#include "core/util/status.h"

namespace dsmoe {

struct MemoryPlan {
  // gRPC, the tokenizer, code, allocator slack: not computed, a fixed allowance.
  static constexpr int64_t kRuntimeAllowance = int64_t{512} << 20;

  int64_t weight_bytes = 0;
  int64_t kv_pages = 0;
  int64_t kv_page_tokens = 0;
  int64_t kv_page_bytes = 0;  // kv_page_tokens · KvBytesPerToken
  KvDType kv_dtype = KvDType::kF32;
  int64_t activation_bytes = 0;
  int64_t runtime_bytes = kRuntimeAllowance;

  int64_t kv_bytes() const { return kv_pages * kv_page_bytes; }
  int64_t kv_tokens() const { return kv_pages * kv_page_tokens; }
  int64_t total_bytes() const {
    return weight_bytes + kv_bytes() + activation_bytes + runtime_bytes;
  }
  // "weights 2.7 GiB + KV cache 16.0 GiB (4681 pages of 16 tokens: 74896 tokens, 224.0 KiB
  // each, bf16) + activations 40.1 MiB + runtime 512.0 MiB = 19.2 GiB".
  std::string Describe() const;
};

// Bytes of the weight matrices a role loads from a checkpoint of `config` stored with
// `bytes_per_weight` (2 for bf16/f16, 4 for f32, 34/32 for q8_0): everything, less the routed
// experts unless `routed_experts` (an attention server with expert servers loads none).
int64_t RoleWeightBytes(const ModelConfig& config, double bytes_per_weight, bool routed_experts);

// The plan of a CPU runner (ModelRunner) with `limits` and `threads` compute threads, holding
// `weight_bytes` of weights, its KV cache in limits.kv_dtype (resolved: kF32 or kBF16, as
// ResolveKvDType gives it for the weights), routed experts computed locally or not.
// INVALID_ARGUMENT as BatchLimits::Resolve and NumKvPages, or for kv_dtype kAuto.
absl::StatusOr<MemoryPlan> PlanMemory(const ModelConfig& config, const BatchLimits& limits,
                                      int64_t weight_bytes, bool local_routed_experts, int threads);

// OK when the plan fits `limit_bytes` (0: no limit). Otherwise RESOURCE_EXHAUSTED naming every
// number, where the limit comes from (`limit_source`), and what to lower.
absl::Status CheckMemoryPlan(const MemoryPlan& plan, int64_t limit_bytes,
                             const std::string& limit_source);

}  // namespace dsmoe
