#include "core/model/memory_plan.h"

#include <algorithm>

#include "core/model/kv_cache.h"
#include "core/model/model_facts.h"
#include "core/util/memory_limit.h"

namespace dsmoe {

std::string MemoryPlan::Describe() const {
  return absl::StrCat(
      "weights ", FormatBytes(weight_bytes), " + KV cache ", FormatBytes(kv_bytes()), " (",
      kv_pages, " pages of ", kv_page_tokens, " tokens: ", kv_tokens(), " tokens, ",
      FormatBytes(kv_page_tokens > 0 ? kv_page_bytes / kv_page_tokens : 0), " each, ",
      KvDTypeName(kv_dtype), ") + activations ", FormatBytes(activation_bytes), " + runtime ",
      FormatBytes(runtime_bytes), " = ", FormatBytes(total_bytes()));
}

int64_t RoleWeightBytes(const ModelConfig& c, double bytes_per_weight, bool routed_experts) {
  int64_t params = CountParameters(c).total;
  if (!routed_experts) {
    // Each routed expert: gate and up [moe_I, H], down [H, moe_I].
    params -= c.NumMoeLayers() * c.n_routed_experts * 3 * c.hidden_size * c.moe_intermediate_size;
  }
  return static_cast<int64_t>(static_cast<double>(params) * bytes_per_weight);
}

absl::StatusOr<MemoryPlan> PlanMemory(const ModelConfig& c, const BatchLimits& limits,
                                      int64_t weight_bytes, bool local_routed_experts,
                                      int threads) {
  DSMOE_ASSIGN_OR_RETURN(const BatchLimits l, limits.Resolve(c));
  if (l.kv_dtype == KvDType::kAuto) {
    return absl::InvalidArgumentError("memory plan: the KV dtype must be resolved (not auto)");
  }
  const int64_t kv_element_bytes = KvElementBytes(l.kv_dtype);
  MemoryPlan plan;
  plan.weight_bytes = weight_bytes;
  plan.kv_dtype = l.kv_dtype;
  DSMOE_ASSIGN_OR_RETURN(plan.kv_pages, NumKvPages(c, l, kv_element_bytes));
  plan.kv_page_tokens = l.kv_page_tokens;
  plan.kv_page_bytes = KvBytesPerToken(c, kv_element_bytes) * l.kv_page_tokens;

  // ModelRunner's arena (its constructor), in floats: hidden, normed, proj, shared_out [T, H];
  // q, attn [T, nh·hd]; k, v [T, nkv·hd]; two [T, widest MLP]; router logits [T, E]; routes
  // [T, k] twice; attention scores per thread.
  const int64_t T = l.max_batch_tokens, H = c.hidden_size, hd = c.head_dim();
  int64_t mlp_width = 0;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    mlp_width =
        std::max(mlp_width, c.IsMoeLayer(i) ? c.shared_intermediate_size() : c.intermediate_size);
  }
  const int64_t k = c.num_experts_per_tok;
  int64_t floats = T * (4 * H + 2 * c.num_attention_heads * hd + 2 * c.num_key_value_heads * hd +
                        2 * mlp_width + c.n_routed_experts + 2 * k);
  floats += std::max(threads, 1) * (8 * l.max_context + 80 * hd);
  // LocalExpertExecutor: gathered rows and outputs [T·k, H], activations [T·k, moe_I] twice.
  if (local_routed_experts && c.n_routed_experts > 0) {
    floats += T * k * (2 * H + 2 * c.moe_intermediate_size);
  }
  // The scheduler's logits, one row per sequence in a step.
  floats += std::min(l.num_slots, T) * c.vocab_size;
  plan.activation_bytes = floats * static_cast<int64_t>(sizeof(float));
  return plan;
}

absl::Status CheckMemoryPlan(const MemoryPlan& plan, int64_t limit_bytes,
                             const std::string& limit_source) {
  if (limit_bytes <= 0 || plan.total_bytes() <= limit_bytes) return absl::OkStatus();
  return absl::ResourceExhaustedError(absl::StrCat(
      "the memory plan (", plan.Describe(), ") exceeds the memory limit of ",
      FormatBytes(limit_bytes), " (", limit_source,
      "); lower --kv-cache-memory (the KV cache may take at most ",
      FormatBytes(std::max<int64_t>(0, limit_bytes - (plan.total_bytes() - plan.kv_bytes()))),
      "), --max-batch-tokens or --num-slots, or raise the limit"));
}

}  // namespace dsmoe
