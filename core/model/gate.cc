#include "core/model/gate.h"

#include <cmath>

namespace dsmoe {

GateParams GateParamsFromConfig(const ModelConfig& c) {
  return {c.n_routed_experts,
          c.num_experts_per_tok,
          c.norm_topk_prob,
          c.topk_method == "group_limited_greedy" ? TopkMethod::kGroupLimitedGreedy
                                                  : TopkMethod::kGreedy,
          c.n_group,
          c.topk_group,
          static_cast<float>(c.routed_scaling_factor)};
}

absl::Status CheckGpuGateSupports(const ModelConfig& c) {
  if (c.n_routed_experts == 0) return absl::OkStatus();  // a dense model: no gate
  const GateParams gate = GateParamsFromConfig(c);
  // RouteTokens keeps every group when n_group is 1 or topk_group == n_group: plain greedy.
  if (gate.topk_method == TopkMethod::kGroupLimitedGreedy && gate.n_group > 1 &&
      gate.topk_group < gate.n_group) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the GPU gate does not implement topk_method \"group_limited_greedy\" (n_group ", c.n_group,
        ", topk_group ", c.topk_group,
        "): it would route this model's tokens differently from the CPU gate; run it on the CPU"));
  }
  if (gate.routed_scaling_factor != 1.0f) {
    return absl::FailedPreconditionError(absl::StrCat(
        "the GPU gate does not apply routed_scaling_factor ", c.routed_scaling_factor,
        " (only 1): it would weight this model's routed experts differently from the CPU gate; "
        "run it on the CPU"));
  }
  if (c.n_routed_experts > 256) {
    return absl::UnimplementedError(
        absl::StrCat("GPU gate supports <= 256 routed experts, not ", c.n_routed_experts));
  }
  return absl::OkStatus();
}

void RouteTokens(const GateParams& params, const float* logits, int64_t T, float* scratch,
                 int32_t* experts, float* weights) {
  const int64_t E = params.num_experts, k = params.top_k;
  for (int64_t t = 0; t < T; ++t) {
    const float* l = logits + t * E;
    float max = l[0];
    for (int64_t e = 1; e < E; ++e) max = l[e] > max ? l[e] : max;
    float sum = 0.0f;
    for (int64_t e = 0; e < E; ++e) sum += scratch[e] = std::exp(l[e] - max);
    const float inv = 1.0f / sum;
    for (int64_t e = 0; e < E; ++e) scratch[e] *= inv;

    if (params.topk_method == TopkMethod::kGroupLimitedGreedy && params.n_group > 1) {
      // Keep the topk_group groups whose best expert scores highest; the rest cannot be chosen.
      const int64_t G = params.n_group, per = E / G;
      float best[64];
      bool keep[64] = {};
      for (int64_t g = 0; g < G; ++g) {
        best[g] = scratch[g * per];
        for (int64_t e = g * per + 1; e < (g + 1) * per; ++e)
          best[g] = scratch[e] > best[g] ? scratch[e] : best[g];
      }
      for (int64_t j = 0; j < params.topk_group; ++j) {
        int64_t top = -1;
        for (int64_t g = 0; g < G; ++g) {
          if (!keep[g] && (top < 0 || best[g] > best[top])) top = g;
        }
        keep[top] = true;
      }
      for (int64_t g = 0; g < G; ++g) {
        if (keep[g]) continue;
        for (int64_t e = g * per; e < (g + 1) * per; ++e) scratch[e] = -1.0f;  // excluded
      }
    }
    // Selection by repeated arg-max: k is small (≤ 8 in every DeepSeekMoE), E ≤ a few hundred.
    int32_t* out_e = experts + t * k;
    float* out_w = weights + t * k;
    float chosen_sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < E; ++e) {
        if (scratch[e] >= 0.0f && (best < 0 || scratch[e] > scratch[best])) best = e;
      }
      out_e[j] = static_cast<int32_t>(best);
      out_w[j] = scratch[best];
      chosen_sum += scratch[best];
      scratch[best] = -1.0f;  // taken
    }
    if (params.norm_topk_prob && k > 1) {
      const float denom = chosen_sum + 1e-20f;
      for (int64_t j = 0; j < k; ++j) out_w[j] /= denom;
    }
    if (params.routed_scaling_factor != 1.0f) {
      for (int64_t j = 0; j < k; ++j) out_w[j] *= params.routed_scaling_factor;
    }
  }
}

}  // namespace dsmoe
