// The DeepSeekMoE router (HF `MoEGate`, inference path): scores = softmax over all routed
// experts of the router logits, keep the top-k, renormalise them only when norm_topk_prob and
// k > 1. Computed in fp32 (the hub code uses the model dtype, so near-ties may legitimately
// route differently on bf16 hardware).
//
// The hooks other gates of the family need are here too: the GShard baseline is this gate with
// top-2 and no shared experts; DeepSeek-V2's group-limited greedy top-k first keeps the
// `topk_group` groups (of n_group contiguous experts) with the highest best score, then takes
// the top-k inside them; a routed scaling factor multiplies the final weights.
#pragma once

#include <cstdint>

#include "core/model/config.h"
#include "core/util/status.h"

namespace dsmoe {

enum class TopkMethod { kGreedy, kGroupLimitedGreedy };

struct GateParams {
  int64_t num_experts = 0;  // n_routed_experts
  int64_t top_k = 0;        // num_experts_per_tok
  bool norm_topk_prob = false;
  TopkMethod topk_method = TopkMethod::kGreedy;
  int64_t n_group = 1;     // group-limited: groups of num_experts / n_group experts (≤ 64 groups)
  int64_t topk_group = 1;  // group-limited: groups kept
  float routed_scaling_factor = 1.0f;
};

// The gate a config asks for (n_routed_experts, num_experts_per_tok, norm_topk_prob, topk_method,
// n_group, topk_group, routed_scaling_factor).
GateParams GateParamsFromConfig(const ModelConfig& config);

// Whether the GPU gate (core/ops/cuda/gate.cu: softmax, greedy top-k, renormalised iff
// norm_topk_prob, at most 256 routed experts) routes `config`'s tokens exactly as RouteTokens
// does. FAILED_PRECONDITION naming the config key and value when it would not — a
// group-limited top-k that excludes groups, a routed_scaling_factor other than 1 — and
// UNIMPLEMENTED beyond 256 routed experts; OK for a model without routed experts. Checked by
// cuda::CudaModelRunner::Create (the GPU expert executor computes no gate: it applies the
// weights it is given).
absl::Status CheckGpuGateSupports(const ModelConfig& config);

// For each of T tokens: logits[t·E .. t·E+E) → experts[t·k ..] (descending weight, ties to the
// lower index) and weights[t·k ..]. `scratch` holds E floats. No allocation.
void RouteTokens(const GateParams& params, const float* logits, int64_t T, float* scratch,
                 int32_t* experts, float* weights);

}  // namespace dsmoe
