// The router against a naive implementation: softmax in double, full sort, take k.
#include "core/model/gate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <set>

#include "tests/test_util.h"

namespace dsmoe {
namespace {

void CheckAgainstNaive(int64_t E, int64_t k, bool norm, uint64_t seed) {
  const int64_t T = 9;
  std::vector<float> logits = testing::RandomFloats(T * E, seed, 4.0f);
  std::vector<float> scratch(E), weights(T * k);
  std::vector<int32_t> experts(T * k);
  RouteTokens({E, k, norm}, logits.data(), T, scratch.data(), experts.data(), weights.data());
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> p(E);
    double max = *std::max_element(logits.begin() + t * E, logits.begin() + (t + 1) * E);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += p[e] = std::exp(logits[t * E + e] - max);
    for (double& v : p) v /= sum;
    std::vector<int> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double chosen = 0;
    for (int64_t j = 0; j < k; ++j) chosen += p[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      EXPECT_EQ(experts[t * k + j], order[j]) << "token " << t << " rank " << j;
      const double want = (norm && k > 1) ? p[order[j]] / chosen : p[order[j]];
      EXPECT_NEAR(weights[t * k + j], want, 1e-6);
    }
  }
}

TEST(Gate, TopKMatchesNaiveSoftmaxAndSort) {
  CheckAgainstNaive(16, 4, false, 1);
  CheckAgainstNaive(64, 6, false, 2);
  CheckAgainstNaive(8, 2, false, 3);
}

TEST(Gate, RenormalisesOnlyWhenAskedAndKAboveOne) {
  CheckAgainstNaive(16, 4, true, 4);
  CheckAgainstNaive(16, 1, true, 5);  // k = 1: HF leaves the raw probability
}

TEST(Gate, GroupLimitedGreedyMatchesNaive) {
  const int64_t E = 32, G = 8, per = E / G, k = 4, keep_groups = 3, T = 20;
  std::vector<float> logits = testing::RandomFloats(T * E, 77, 3.0f);
  std::vector<float> scratch(E), weights(T * k);
  std::vector<int32_t> experts(T * k);
  GateParams p{E, k, true, TopkMethod::kGroupLimitedGreedy, G, keep_groups, 2.5f};
  RouteTokens(p, logits.data(), T, scratch.data(), experts.data(), weights.data());
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> prob(E);
    double sum = 0;
    for (int64_t e = 0; e < E; ++e) sum += prob[e] = std::exp(logits[t * E + e]);
    for (double& v : prob) v /= sum;
    std::vector<int> groups(G);
    std::iota(groups.begin(), groups.end(), 0);
    auto group_best = [&](int g) {
      return *std::max_element(prob.begin() + g * per, prob.begin() + (g + 1) * per);
    };
    std::stable_sort(groups.begin(), groups.end(),
                     [&](int a, int b) { return group_best(a) > group_best(b); });
    std::vector<int> allowed;
    for (int j = 0; j < keep_groups; ++j)
      for (int e = groups[j] * per; e < (groups[j] + 1) * per; ++e) allowed.push_back(e);
    std::stable_sort(allowed.begin(), allowed.end(), [&](int a, int b) {
      return prob[a] > prob[b] || (prob[a] == prob[b] && a < b);
    });
    double chosen = 0;
    for (int j = 0; j < k; ++j) chosen += prob[allowed[j]];
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(experts[t * k + j], allowed[j]) << "token " << t;
      EXPECT_NEAR(weights[t * k + j], 2.5 * prob[allowed[j]] / chosen, 1e-5);
    }
  }
}

TEST(Gate, TiesGoToTheLowerIndex) {
  const std::vector<float> logits = {0.5f, 2.0f, 2.0f, 2.0f};
  std::vector<float> scratch(4), w(2);
  std::vector<int32_t> e(2);
  RouteTokens({4, 2, false}, logits.data(), 1, scratch.data(), e.data(), w.data());
  EXPECT_EQ(e[0], 1);
  EXPECT_EQ(e[1], 2);
}

// --- Device-limited routing ---

using Holders = std::vector<std::vector<int>>;  // [expert] → servers holding it

// Device-limited routing of one token, naively: probabilities in double; a server's affinity is
// the best probability among the experts it holds; servers sorted by affinity (stable: ties to
// the lower index) are kept until there are M of them and they hold at least k experts; the
// experts they hold are fully sorted and the first k taken.
struct NaiveRoute {
  std::vector<int> experts;
  std::vector<double> weights;
};
NaiveRoute NaiveDeviceLimited(const float* logits, int E, int k, const Holders& holders, int S,
                              int M, bool norm, double scale) {
  std::vector<double> p(E);
  const double max = *std::max_element(logits, logits + E);
  double sum = 0;
  for (int e = 0; e < E; ++e) sum += p[e] = std::exp(logits[e] - max);
  for (double& v : p) v /= sum;
  std::vector<double> affinity(S, -1.0);
  for (int e = 0; e < E; ++e)
    for (int s : holders[e]) affinity[s] = std::max(affinity[s], p[e]);
  std::vector<int> servers(S);
  std::iota(servers.begin(), servers.end(), 0);
  std::stable_sort(servers.begin(), servers.end(),
                   [&](int a, int b) { return affinity[a] > affinity[b]; });
  std::set<int> kept;
  std::vector<int> allowed;
  for (int s : servers) {
    kept.insert(s);
    allowed.clear();
    for (int e = 0; e < E; ++e) {
      for (int h : holders[e]) {
        if (kept.count(h) != 0) {
          allowed.push_back(e);
          break;
        }
      }
    }
    if (static_cast<int>(kept.size()) >= M && static_cast<int>(allowed.size()) >= k) break;
  }
  std::stable_sort(allowed.begin(), allowed.end(), [&](int a, int b) { return p[a] > p[b]; });
  NaiveRoute r;
  double chosen = 0;
  for (int j = 0; j < k; ++j) chosen += p[allowed[j]];
  for (int j = 0; j < k; ++j) {
    r.experts.push_back(allowed[j]);
    r.weights.push_back(scale * ((norm && k > 1) ? p[allowed[j]] / chosen : p[allowed[j]]));
  }
  return r;
}

// RouteTokens with `holders` (one MoE layer) limited to M of S servers, against the naive
// reference, on T random tokens.
void CheckDeviceLimited(int E, int k, const Holders& holders, int S, int M, bool norm, float scale,
                        uint64_t seed) {
  const int T = 40;
  auto routing = DeviceLimitedRouting::Create(S, M, {holders});
  ASSERT_TRUE(routing.ok()) << routing.status();
  GateParams base{E, k, norm};
  base.routed_scaling_factor = scale;
  const GateParams p = routing->ForLayer(base, 0);
  std::vector<float> logits = testing::RandomFloats(T * E, seed, 4.0f);
  std::vector<float> scratch(E), weights(T * k);
  std::vector<int32_t> experts(T * k);
  RouteTokens(p, logits.data(), T, scratch.data(), experts.data(), weights.data());
  for (int t = 0; t < T; ++t) {
    const NaiveRoute want =
        NaiveDeviceLimited(logits.data() + t * E, E, k, holders, S, M, norm, scale);
    for (int j = 0; j < k; ++j) {
      EXPECT_EQ(experts[t * k + j], want.experts[j])
          << "S " << S << " M " << M << " token " << t << " rank " << j;
      EXPECT_NEAR(weights[t * k + j], want.weights[j], 1e-5 * scale);
    }
  }
}

// Round-robin as router::Placement computes it (written out here): expert e on (e + shift) % S.
Holders RoundRobin(int E, int S, int shift) {
  Holders h(E);
  for (int e = 0; e < E; ++e) h[e] = {(e + shift) % S};
  return h;
}

TEST(DeviceLimitedRouting, MatchesNaiveOnRoundRobinPlacements) {
  for (int S : {2, 4, 8}) {
    for (int M = 1; M < S && M <= 3; ++M) {
      CheckDeviceLimited(64, 6, RoundRobin(64, S, 1), S, M, false, 1.0f, 100 + S * 10 + M);
      CheckDeviceLimited(16, 2, RoundRobin(16, S, 0), S, M, true, 2.5f, 200 + S * 10 + M);
    }
  }
}

TEST(DeviceLimitedRouting, AReplicatedExpertBelongsToEveryServerHoldingIt) {
  // 32 experts on 6 servers, 1 to 3 copies each on distinct servers.
  const int E = 32, S = 6;
  std::mt19937 rng(5);
  Holders h(E);
  for (int e = 0; e < E; ++e) {
    std::vector<int> servers(S);
    std::iota(servers.begin(), servers.end(), 0);
    std::shuffle(servers.begin(), servers.end(), rng);
    h[e].assign(servers.begin(), servers.begin() + 1 + static_cast<int>(rng() % 3));
  }
  for (int M : {1, 2, 4}) CheckDeviceLimited(E, 4, h, S, M, true, 1.0f, 300 + M);
}

TEST(DeviceLimitedRouting, KeepsMoreServersWhenTheBestHoldFewerThanKExperts) {
  // Server 0 holds expert 0 alone; expert 0 scores best, so M = 1 must still yield k = 3.
  const Holders h = {{0}, {1}, {1}, {1}, {2}, {2}, {2}, {2}};
  const std::vector<float> logits = {5.0f, 0.1f, 0.2f, 0.3f, 4.0f, 3.0f, 0.0f, 0.0f};
  auto routing = DeviceLimitedRouting::Create(3, 1, {h});
  ASSERT_TRUE(routing.ok());
  std::vector<float> scratch(8), w(3);
  std::vector<int32_t> e(3);
  RouteTokens(routing->ForLayer({8, 3, false}, 0), logits.data(), 1, scratch.data(), e.data(),
              w.data());
  // Server 0 (5.0), then server 2 (4.0): experts 0, 4, 5; server 1 is never kept.
  EXPECT_THAT(e, ::testing::ElementsAre(0, 4, 5));
  CheckDeviceLimited(8, 3, h, 3, 1, false, 1.0f, 7);
}

TEST(DeviceLimitedRouting, EveryTokenSpansAtMostMServers) {
  const int E = 64, k = 6, S = 8, T = 200;
  const Holders h = RoundRobin(E, S, 3);
  for (int M : {1, 2, 3}) {
    auto routing = DeviceLimitedRouting::Create(S, M, {h});
    ASSERT_TRUE(routing.ok());
    std::vector<float> logits = testing::RandomFloats(T * E, 40 + M, 4.0f);
    std::vector<float> scratch(E), w(T * k);
    std::vector<int32_t> e(T * k);
    RouteTokens(routing->ForLayer({E, k, false}, 0), logits.data(), T, scratch.data(), e.data(),
                w.data());
    for (int t = 0; t < T; ++t) {
      std::set<int> servers;
      for (int j = 0; j < k; ++j) servers.insert(h[e[t * k + j]][0]);
      EXPECT_LE(static_cast<int>(servers.size()), M) << "token " << t;
    }
  }
}

TEST(DeviceLimitedRouting, AllServersOrOffIsPlainGreedy) {
  const int E = 64, k = 6, S = 4, T = 30;
  std::vector<float> logits = testing::RandomFloats(T * E, 9, 4.0f);
  std::vector<float> scratch(E), w0(T * k), w1(T * k);
  std::vector<int32_t> e0(T * k), e1(T * k);
  RouteTokens({E, k, false}, logits.data(), T, scratch.data(), e0.data(), w0.data());
  auto all = DeviceLimitedRouting::Create(S, S, {RoundRobin(E, S, 0)});
  ASSERT_TRUE(all.ok());
  RouteTokens(all->ForLayer({E, k, false}, 0), logits.data(), T, scratch.data(), e1.data(),
              w1.data());
  EXPECT_EQ(e0, e1);
  EXPECT_EQ(w0, w1);
  EXPECT_EQ(GateParams{}.device_limit.max_servers, 0);  // off by default
}

TEST(DeviceLimitedRouting, ADenseLayerIsLeftAlone) {
  auto r = DeviceLimitedRouting::Create(2, 1, {{}, RoundRobin(8, 2, 0)});
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->ForLayer({8, 2, false}, 0).device_limit.max_servers, 0);
  EXPECT_EQ(r->ForLayer({8, 2, false}, 1).device_limit.max_servers, 1);
}

TEST(DeviceLimitedRouting, RefusesBadLimitsAndHoldersNamingThem) {
  const Holders h = RoundRobin(8, 4, 0);
  for (int M : {0, -1, 5}) {
    const absl::Status s = DeviceLimitedRouting::Create(4, M, {h}).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << M;
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("must be 1 to 4")) << M;
  }
  EXPECT_EQ(DeviceLimitedRouting::Create(65, 1, {RoundRobin(8, 65, 0)}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(DeviceLimitedRouting::Create(4, 1, {{{0}, {4}}}).status().message()),
              ::testing::HasSubstr("held by server 4 of 4"));
  EXPECT_THAT(std::string(DeviceLimitedRouting::Create(4, 1, {{{0}, {}}}).status().message()),
              ::testing::HasSubstr("routed expert 1 of layer 0 has no holder"));
}

// A DeepSeekMoE config.json (the keys of deepseek-moe-16b-base, shrunk), plus `extra` keys.
ModelConfig MoeConfig(const std::string& extra) {
  const std::string text =
      R"({"model_type": "deepseek", "hidden_size": 64, "num_attention_heads": 4,
    "num_hidden_layers": 2, "first_k_dense_replace": 1, "intermediate_size": 128,
    "moe_intermediate_size": 32, "n_routed_experts": 16, "n_shared_experts": 2,
    "num_experts_per_tok": 4, "norm_topk_prob": false, "scoring_func": "softmax",
    "vocab_size": 512, "bos_token_id": 0, "eos_token_id": 1)" +
      extra + "}";
  auto c = ModelConfig::FromJson(text, "config.json");
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? *c : ModelConfig{};
}

// The GPU gate (softmax, greedy top-k, optional renormalisation) routes these as RouteTokens.
TEST(GpuGate, AcceptsWhatItComputesLikeTheCpuGate) {
  EXPECT_TRUE(CheckGpuGateSupports(MoeConfig("")).ok());
  EXPECT_TRUE(CheckGpuGateSupports(MoeConfig(R"(, "norm_topk_prob": true)")).ok());
  EXPECT_TRUE(CheckGpuGateSupports(MoeConfig(R"(, "routed_scaling_factor": 1.0)")).ok());
  // Group-limited with every group kept (or one group) is greedy: RouteTokens excludes nothing.
  EXPECT_TRUE(CheckGpuGateSupports(MoeConfig(R"(, "topk_method": "group_limited_greedy",
      "n_group": 4, "topk_group": 4)"))
                  .ok());
  EXPECT_TRUE(
      CheckGpuGateSupports(MoeConfig(R"(, "topk_method": "group_limited_greedy", "n_group": 1)"))
          .ok());
  ModelConfig dense = MoeConfig("");
  dense.n_routed_experts = 0;  // no gate at all
  dense.routed_scaling_factor = 2.0;
  EXPECT_TRUE(CheckGpuGateSupports(dense).ok());
}

TEST(GpuGate, RefusesGroupLimitedGreedyNamingTheKeys) {
  const absl::Status s = CheckGpuGateSupports(
      MoeConfig(R"(, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2)"));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()),
              ::testing::HasSubstr("topk_method \"group_limited_greedy\""));
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("n_group 4, topk_group 2"));
}

TEST(GpuGate, RefusesARoutedScalingFactorNamingIt) {
  const absl::Status s = CheckGpuGateSupports(MoeConfig(R"(, "routed_scaling_factor": 2.5)"));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("routed_scaling_factor 2.5"));
}

TEST(GpuGate, RefusesDeviceLimitedRouting) {
  EXPECT_TRUE(CheckGpuGateSupportsDeviceLimit(0).ok());
  const absl::Status s = CheckGpuGateSupportsDeviceLimit(2);
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("device-limited routing"));
}

TEST(DeviceLimitedRouting, ChecksItCoversTheModel) {
  const ModelConfig c = MoeConfig("");  // 2 layers, the first dense; 16 routed experts
  auto ok = DeviceLimitedRouting::Create(2, 1, {{}, RoundRobin(16, 2, 0)});
  ASSERT_TRUE(ok.ok());
  EXPECT_TRUE(ok->CheckCovers(c).ok());
  auto short_layer = DeviceLimitedRouting::Create(2, 1, {{}, RoundRobin(8, 2, 0)});
  EXPECT_EQ(short_layer->CheckCovers(c).code(), absl::StatusCode::kInvalidArgument);
  auto one_layer = DeviceLimitedRouting::Create(2, 1, {RoundRobin(16, 2, 0)});
  EXPECT_EQ(one_layer->CheckCovers(c).code(), absl::StatusCode::kInvalidArgument);
}

TEST(GpuGate, GateParamsFollowTheConfig) {
  const GateParams p = GateParamsFromConfig(MoeConfig(
      R"(, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
      "routed_scaling_factor": 2.5, "norm_topk_prob": true)"));
  EXPECT_EQ(p.num_experts, 16);
  EXPECT_EQ(p.top_k, 4);
  EXPECT_TRUE(p.norm_topk_prob);
  EXPECT_EQ(p.topk_method, TopkMethod::kGroupLimitedGreedy);
  EXPECT_EQ(p.n_group, 4);
  EXPECT_EQ(p.topk_group, 2);
  EXPECT_EQ(p.routed_scaling_factor, 2.5f);
}

}  // namespace
}  // namespace dsmoe
