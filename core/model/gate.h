// The DeepSeekMoE router (HF `MoEGate`, inference path): scores = softmax over all routed
// experts of the router logits, keep the top-k, renormalise them only when norm_topk_prob and
// k > 1. Computed in fp32 (the hub code uses the model dtype, so near-ties may legitimately
// route differently on bf16 hardware).
//
// The hooks other gates of the family need are here too: the GShard baseline is this gate with
// top-2 and no shared experts; DeepSeek-V2's group-limited greedy top-k first keeps the
// `topk_group` groups (of n_group contiguous experts) with the highest best score, then takes
// the top-k inside them; a routed scaling factor multiplies the final weights.
//
// Device-limited routing (DeepSeek-V2 §2.2.2) bounds how many expert servers a token's routed
// experts span: a server's affinity is the highest score among the experts it holds, only the
// M servers of highest affinity are kept, and the top-k is taken over the experts they hold. It
// is group-limited greedy with the groups = the expert servers of the placement in use (a
// replicated expert belongs to every server holding a copy). Off unless asked for: a model not
// trained with it routes differently under it (docs/fanout.md measures how much).
#pragma once

#include <cstdint>
#include <vector>

#include "core/model/config.h"
#include "core/util/status.h"

namespace dsmoe {

enum class TopkMethod { kGreedy, kGroupLimitedGreedy };

// Device-limited routing for one MoE layer: a view into DeviceLimitedRouting.
struct DeviceLimit {
  int64_t max_servers = 0;  // M: a token's routed experts come from M servers; 0: off
  int64_t num_servers = 0;  // ≤ 64
  // [num_experts]: bit s set when server s holds the expert.
  const uint64_t* expert_servers = nullptr;
};

struct GateParams {
  int64_t num_experts = 0;  // n_routed_experts
  int64_t top_k = 0;        // num_experts_per_tok
  bool norm_topk_prob = false;
  TopkMethod topk_method = TopkMethod::kGreedy;
  int64_t n_group = 1;     // group-limited: groups of num_experts / n_group experts (≤ 64 groups)
  int64_t topk_group = 1;  // group-limited: groups kept
  float routed_scaling_factor = 1.0f;
  DeviceLimit device_limit;  // off by default; per layer (DeviceLimitedRouting::ForLayer)
};

// Which expert servers hold each routed expert of every MoE layer, for device-limited routing;
// made from the placement in use (router/device_limit.h). Immutable after Create: thread-safe.
class DeviceLimitedRouting {
 public:
  static constexpr int kMaxServers = 64;  // one bit per server in a uint64_t
  // holders[layer][expert]: the servers holding it (empty for a dense layer). INVALID_ARGUMENT
  // unless 1 <= max_servers <= num_servers <= 64 and every routed expert of a MoE layer has a
  // holder in [0, num_servers).
  static absl::StatusOr<DeviceLimitedRouting> Create(
      int num_servers, int max_servers, const std::vector<std::vector<std::vector<int>>>& holders);

  // INVALID_ARGUMENT unless it covers `config`'s layers and routed experts exactly.
  absl::Status CheckCovers(const ModelConfig& config) const;
  // `base` limited to max_servers() servers of this layer's placement (`base` for a dense
  // layer). REQUIRES: layer < the number of layers given to Create.
  GateParams ForLayer(const GateParams& base, int64_t layer) const {
    GateParams p = base;
    if (masks_[layer].empty()) return p;
    p.device_limit = {max_servers_, num_servers_, masks_[layer].data()};
    return p;
  }
  int max_servers() const { return max_servers_; }
  int num_servers() const { return num_servers_; }

 private:
  DeviceLimitedRouting() = default;
  int num_servers_ = 0, max_servers_ = 0;
  std::vector<std::vector<uint64_t>> masks_;  // [layer][expert]: servers holding it, as bits
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

// FAILED_PRECONDITION when device-limited routing (max_servers > 0) is asked of the GPU gate,
// which does not implement it; OK otherwise.
absl::Status CheckGpuGateSupportsDeviceLimit(int max_servers);

// For each of T tokens: logits[t·E .. t·E+E) → experts[t·k ..] (descending weight, ties to the
// lower index) and weights[t·k ..]. `scratch` holds E floats. No allocation.
//
// With params.device_limit on (0 < max_servers < num_servers), servers are kept in order of
// affinity (ties to the lower index) until M are kept and they hold at least k experts still
// eligible between them, so a placement that leaves a server with fewer than k experts of a
// layer keeps more than M rather than routing a token to fewer than k experts.
void RouteTokens(const GateParams& params, const float* logits, int64_t T, float* scratch,
                 int32_t* experts, float* weights);

}  // namespace dsmoe
