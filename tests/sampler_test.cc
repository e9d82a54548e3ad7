#include "core/model/sampler.h"

#include <gtest/gtest.h>

#include <cmath>

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
