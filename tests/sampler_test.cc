#include "core/model/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dsmoe {
namespace {

TEST(Sampler, GreedyPicksTheArgMaxAndLowestIdOnTies) {
  const std::vector<float> logits = {0.1f, 3.0f, -2.0f, 3.0f};
  Sampler s(4, {});
  EXPECT_EQ(s.Sample(logits.data()), 1);
}

TEST(Sampler, TopKOneAndTinyTopPAreGreedy) {
  const std::vector<float> logits = {0.1f, 0.3f, 2.0f, 0.2f};
  Sampler k1(4, {1.5, 1, 1.0, 7});
  Sampler p0(4, {1.5, 0, 1e-6, 7});
  for (int i = 0; i < 50; ++i) {
    EXPECT_EQ(k1.Sample(logits.data()), 2);
    EXPECT_EQ(p0.Sample(logits.data()), 2);
  }
}

TEST(Sampler, FrequenciesFollowTheTemperedSoftmax) {
  // p = softmax(logits / T) with T = 2: logits chosen so that p = {0.5, 0.3, 0.2}.
  const std::vector<float> logits = {2.0f * std::log(0.5f), 2.0f * std::log(0.3f),
                                     2.0f * std::log(0.2f)};
  Sampler s(3, {2.0, 0, 1.0, 123});
  std::vector<int> counts(3);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[s.Sample(logits.data())];
  EXPECT_NEAR(counts[0] / double(n), 0.5, 0.02);
  EXPECT_NEAR(counts[1] / double(n), 0.3, 0.02);
  EXPECT_NEAR(counts[2] / double(n), 0.2, 0.02);
}

TEST(Sampler, TopPKeepsTheSmallestNucleus) {
  // p = {0.5, 0.3, 0.2}; top_p = 0.7 keeps {0, 1} renormalised to {0.625, 0.375}.
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.2f)};
  Sampler s(3, {1.0, 0, 0.7, 9});
  std::vector<int> counts(3);
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++counts[s.Sample(logits.data())];
  EXPECT_EQ(counts[2], 0);
  EXPECT_NEAR(counts[0] / double(n), 0.625, 0.02);
}

TEST(Sampler, SameSeedSameDraws) {
  std::vector<float> logits(100);
  for (int i = 0; i < 100; ++i) logits[i] = std::sin(i * 0.7f);
  Sampler a(100, {0.8, 40, 0.95, 5}), b(100, {0.8, 40, 0.95, 5}), c(100, {0.8, 40, 0.95, 6});
  int differ = 0;
  for (int i = 0; i < 64; ++i) {
    const int x = a.Sample(logits.data());
    EXPECT_EQ(x, b.Sample(logits.data()));
    differ += x != c.Sample(logits.data());
  }
  EXPECT_GT(differ, 0);
}

TEST(Sampler, ArgMaxTakesTheFirstMaximumAndSkipsNaN) {
  // Lengths around the 8-lane blocks, the maximum in the block part and in the tail.
  for (int n : {1, 7, 8, 9, 16, 17, 100}) {
    for (int at = 0; at < n; at += 3) {
      std::vector<float> v(n, -1.0f);
      v[at] = 5.0f;
      if (at + 2 < n) v[at + 2] = 5.0f;  // a tie later: the first one wins
      if (at + 1 < n) v[at + 1] = std::nanf("");
      EXPECT_EQ(ArgMax(v.data(), n), at) << "n=" << n;
    }
  }
  const std::vector<float> nan_first = {std::nanf(""), -3.0f, -2.0f};
  EXPECT_EQ(ArgMax(nan_first.data(), 3), 2);
}

// A vocabulary of 3,000 with a heavy tail: the nucleus of top_p = 0.9 holds hundreds of tokens,
// so the sampler's selection (halving, the light-tail cut) runs in full. The reference here
// sorts everything, as the definition says: p = softmax(logits / T), the smallest prefix by
// descending p reaching top_p, renormalised.
TEST(Sampler, NucleusOfAHeavyTailMatchesAFullSort) {
  const int V = 3000;
  const double T = 0.7, top_p = 0.9;
  std::vector<float> logits(V);
  for (int i = 0; i < V; ++i) logits[i] = static_cast<float>(std::sin(i * 12.9898) * 3.0);
  logits[17] = std::nanf("");
  std::vector<std::pair<double, int>> p;
  double total = 0;
  for (int i = 0; i < V; ++i) {
    if (std::isnan(logits[i])) continue;
    p.emplace_back(std::exp(logits[i] / T), i);
    total += p.back().first;
  }
  std::sort(p.begin(), p.end(), [](auto& a, auto& b) { return a.first > b.first; });
  std::vector<double> want(V, 0.0);
  double mass = 0;
  size_t nucleus = 0;
  while (mass < top_p * total) mass += p[nucleus++].first;
  for (size_t i = 0; i < nucleus; ++i) want[p[i].second] = p[i].first / mass;
  ASSERT_GT(nucleus, 200u);

  Sampler s(V, {T, 0, top_p, 3});
  const int n = 60000;
  std::vector<int> counts(V);
  for (int i = 0; i < n; ++i) ++counts[s.Sample(logits.data())];
  double heaviest = 0;
  for (int i = 0; i < V; ++i) {
    if (want[i] == 0.0) {
      EXPECT_EQ(counts[i], 0) << "token " << i << " is outside the nucleus";
      continue;
    }
    heaviest = std::max(heaviest, want[i]);
    // Binomial standard deviation, 5 sigma.
    EXPECT_NEAR(counts[i] / double(n), want[i], 5 * std::sqrt(want[i] / n) + 1e-5) << i;
  }
  EXPECT_GT(heaviest, 0.0);
}

TEST(Sampler, TemperatureAloneFollowsTheSoftmaxOfTheWholeVocabulary) {
  const int V = 1000;
  std::vector<float> logits(V);
  for (int i = 0; i < V; ++i) logits[i] = static_cast<float>(std::cos(i * 0.37) * 2.0);
  logits[5] = std::nanf("");
  double total = 0;
  for (int i = 0; i < V; ++i) total += i == 5 ? 0.0 : std::exp(logits[i] / 1.3);
  Sampler s(V, {1.3, 0, 1.0, 11});
  const int n = 200000;
  std::vector<int> counts(V);
  for (int i = 0; i < n; ++i) ++counts[s.Sample(logits.data())];
  EXPECT_EQ(counts[5], 0) << "a NaN logit was drawn";
  for (int i = 0; i < V; i += 37) {
    if (i == 5) continue;
    const double want = std::exp(logits[i] / 1.3) / total;
    EXPECT_NEAR(counts[i] / double(n), want, 5 * std::sqrt(want / n) + 1e-5) << i;
  }
}

TEST(SamplingParams, RejectsOutOfRangeValues) {
  EXPECT_EQ(SamplingParams({-0.1, 0, 1.0, 0}).Validate().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SamplingParams({1.0, -1, 1.0, 0}).Validate().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SamplingParams({1.0, 0, 0.0, 0}).Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(SamplingParams({1.0, 0, 1.5, 0}).Validate().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(SamplingParams({0.0, 0, 1.0, 0}).Validate().ok());
}

}  // namespace
}  // namespace dsmoe
