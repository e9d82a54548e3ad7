// The router against a naive implementation: softmax in double, full sort, take k.
#include "core/model/gate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>

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
