// The router against a naive implementation: softmax in double, full sort, take k.
#include "core/model/gate.h"

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

}  // namespace
}  // namespace dsmoe
