#include "core/model/gate.h"

#include <bit>
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

absl::StatusOr<DeviceLimitedRouting> DeviceLimitedRouting::Create(
    int num_servers, int max_servers, const std::vector<std::vector<std::vector<int>>>& holders) {
  if (num_servers < 1 || num_servers > kMaxServers) {
    return absl::InvalidArgumentError(absl::StrCat("device-limited routing supports 1 to ",
                                                   kMaxServers, " expert servers, not ",
                                                   num_servers));
  }
  if (max_servers < 1 || max_servers > num_servers) {
    return absl::InvalidArgumentError(absl::StrCat("device-limited routing to ", max_servers,
                                                   " expert servers: must be 1 to ", num_servers,
                                                   " (the expert servers of the placement)"));
  }
  DeviceLimitedRouting r;
  r.num_servers_ = num_servers;
  r.max_servers_ = max_servers;
  r.masks_.resize(holders.size());
  for (size_t layer = 0; layer < holders.size(); ++layer) {
    for (size_t e = 0; e < holders[layer].size(); ++e) {
      uint64_t mask = 0;
      for (int s : holders[layer][e]) {
        if (s < 0 || s >= num_servers) {
          return absl::InvalidArgumentError(absl::StrCat("routed expert ", e, " of layer ", layer,
                                                         " is held by server ", s, " of ",
                                                         num_servers));
        }
        mask |= uint64_t{1} << s;
      }
      if (mask == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("routed expert ", e, " of layer ", layer, " has no holder"));
      }
      r.masks_[layer].push_back(mask);
    }
  }
  return r;
}

absl::Status DeviceLimitedRouting::CheckCovers(const ModelConfig& c) const {
  if (static_cast<int64_t>(masks_.size()) != c.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("device-limited routing covers ", masks_.size(),
                                                   " layers, the model has ", c.num_hidden_layers));
  }
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const int64_t want = c.IsMoeLayer(layer) ? c.n_routed_experts : 0;
    if (static_cast<int64_t>(masks_[layer].size()) != want) {
      return absl::InvalidArgumentError(
          absl::StrCat("device-limited routing covers ", masks_[layer].size(),
                       " routed experts of layer ", layer, ", the model has ", want));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckGpuGateSupportsDeviceLimit(int max_servers) {
  if (max_servers <= 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the GPU gate does not implement device-limited routing (--device-limited-routing ",
      max_servers, "): run the attention server on the CPU, or without it"));
}

namespace {

// Device-limited routing of one token: experts of the servers not kept get score -1 (excluded).
// `scores` are the token's probabilities, -1 where already excluded.
void LimitToServers(const DeviceLimit& d, int64_t E, int64_t k, float* scores) {
  const int64_t S = d.num_servers;
  float affinity[DeviceLimitedRouting::kMaxServers];
  for (int64_t s = 0; s < S; ++s) affinity[s] = -1.0f;
  for (int64_t e = 0; e < E; ++e) {
    if (scores[e] < 0.0f) continue;
    for (uint64_t m = d.expert_servers[e]; m != 0; m &= m - 1) {
      const int s = std::countr_zero(m);
      affinity[s] = scores[e] > affinity[s] ? scores[e] : affinity[s];
    }
  }
  uint64_t kept = 0;
  for (int64_t j = 0; j < S; ++j) {
    int64_t top = -1;
    for (int64_t s = 0; s < S; ++s) {
      if ((kept >> s & 1) == 0 && (top < 0 || affinity[s] > affinity[top])) top = s;
    }
    kept |= uint64_t{1} << top;
    if (j + 1 < d.max_servers) continue;
    int64_t eligible = 0;  // experts the kept servers hold that are still in the running
    for (int64_t e = 0; e < E; ++e) eligible += scores[e] >= 0.0f && (d.expert_servers[e] & kept);
    if (eligible >= k) break;
  }
  for (int64_t e = 0; e < E; ++e) {
    if ((d.expert_servers[e] & kept) == 0) scores[e] = -1.0f;  // excluded
  }
}

}  // namespace

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
    const DeviceLimit& d = params.device_limit;
    if (d.max_servers > 0 && d.max_servers < d.num_servers) LimitToServers(d, E, k, scratch);
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
