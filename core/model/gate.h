// The DeepSeekMoE router (HF `MoEGate`, inference path): scores = softmax over all routed
// experts of the router logits, keep the top-k, renormalise them only when norm_topk_prob and
// k > 1. Computed in fp32 (the hub code uses the model dtype, so near-ties may legitimately
// route differently on bf16 hardware).
#pragma once

#include <cstdint>

namespace dsmoe {

struct GateParams {
  int64_t num_experts = 0;  // n_routed_experts
  int64_t top_k = 0;        // num_experts_per_tok
  bool norm_topk_prob = false;
};

// For each of T tokens: logits[t·E .. t·E+E) → experts[t·k ..] (descending weight, ties to the
// lower index) and weights[t·k ..]. `scratch` holds E floats. No allocation.
void RouteTokens(const GateParams& params, const float* logits, int64_t T, float* scratch,
                 int32_t* experts, float* weights);

}  // namespace dsmoe
