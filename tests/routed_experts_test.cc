// The expert-side computation the cluster relies on: splitting each token's routed experts
// between two processes that each hold half of the experts, and adding their partial sums,
// gives what one process holding all of them computes — and both equal a naive per-token loop.
#include "core/model/routed_experts.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "core/ops/kernels.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using ::testing::HasSubstr;

TEST(LocalExpertExecutor, SplitAcrossTwoHoldersEqualsOneAndTheNaiveSum) {
  testing::TempDir dir;
  const ModelConfig c = testing::WriteTinyModel(dir.path(), DType::kBF16);
  const int64_t H = c.hidden_size, E = c.n_routed_experts, k = c.num_experts_per_tok, T = 5,
                layer = 2;
  auto all = ModelWeights::Load(dir.path());
  WeightSelection even, odd;
  even.all_routed_experts = odd.all_routed_experts = false;
  for (int64_t e = 0; e < E; ++e) (e % 2 ? odd : even).routed_experts.insert({layer, e});
  auto w_even = ModelWeights::Load(dir.path(), even);
  auto w_odd = ModelWeights::Load(dir.path(), odd);
  ASSERT_TRUE(all.ok() && w_even.ok() && w_odd.ok());
  ThreadPool pool(2);
  LocalExpertExecutor full(**all, pool, 64), half_even(**w_even, pool, 64),
      half_odd(**w_odd, pool, 64);

  const std::vector<float> x = testing::RandomFloats(T * H, 11);
  std::vector<int32_t> experts(T * k);
  std::vector<float> weights(T * k);
  for (int64_t i = 0; i < T * k; ++i) {
    experts[i] = static_cast<int32_t>((i * 7 + i / k) % E);
    weights[i] = 0.1f + 0.05f * static_cast<float>(i % 4);
  }
  std::vector<float> want(T * H);
  ASSERT_TRUE(full.Run(layer, x.data(), T, experts.data(), weights.data(), k, want.data()).ok());

  // Split the assignments by holder, as a dispatch plan would.
  std::vector<int32_t> tok[2], exp[2];
  std::vector<float> wt[2];
  for (int64_t i = 0; i < T * k; ++i) {
    const int h = experts[i] % 2;
    tok[h].push_back(static_cast<int32_t>(i / k));
    exp[h].push_back(experts[i]);
    wt[h].push_back(weights[i]);
  }
  std::vector<float> part0(T * H), part1(T * H);
  ASSERT_TRUE(
      half_even
          .RunAssignments(layer, x.data(), T,
                          {tok[0].data(), exp[0].data(), wt[0].data(), (int64_t)tok[0].size()},
                          part0.data())
          .ok());
  ASSERT_TRUE(
      half_odd
          .RunAssignments(layer, x.data(), T,
                          {tok[1].data(), exp[1].data(), wt[1].data(), (int64_t)tok[1].size()},
                          part1.data())
          .ok());
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> naive(H);
    for (int64_t j = 0; j < k; ++j) {
      const std::vector<double> y =
          testing::NaiveExpert((*all)->layers[layer].routed[experts[t * k + j]], x.data() + t * H);
      for (int64_t h = 0; h < H; ++h) naive[h] += weights[t * k + j] * y[h];
    }
    for (int64_t h = 0; h < H; ++h) {
      ASSERT_NEAR(want[t * H + h], naive[h], 1e-5) << "token " << t;
      ASSERT_NEAR(part0[t * H + h] + part1[t * H + h], want[t * H + h], 1e-5) << "token " << t;
    }
  }

  // Errors: an expert this holder lacks, a token outside the batch.
  const int32_t t0 = 0, odd_expert = 1, bad_token = 7;
  const float w1 = 1.0f;
  absl::Status s =
      half_even.RunAssignments(layer, x.data(), T, {&t0, &odd_expert, &w1, 1}, part0.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("routed expert (layer 2, expert 1) is not held"));
  const int32_t even_expert = 0;
  s = half_even.RunAssignments(layer, x.data(), T, {&bad_token, &even_expert, &w1, 1},
                               part0.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  s = half_even.RunAssignments(0, x.data(), T, {&t0, &even_expert, &w1, 1}, part0.data());
  EXPECT_THAT(std::string(s.message()), HasSubstr("layer 0 is not a MoE layer"));
}

}  // namespace
}  // namespace dsmoe
