// The KV cache's element type (issue 19): which one `auto` picks, that the writer rounds to
// nearest even, and that a runner with BF16 pages stays within a bound of one with F32 pages on
// the small preset — logits and greedy tokens, teacher-forced step by step so that every step
// is compared (a token that differs must be a near-tie of the F32 logits).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "absl/strings/match.h"
#include "core/model/kv_cache.h"
#include "core/model/make_model.h"
#include "core/model/model_runner.h"
#include "core/model/sampler.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

TEST(KvDType, ParsesItsNamesAndRefusesOthersClearly) {
  EXPECT_EQ(*ParseKvDType("auto"), KvDType::kAuto);
  EXPECT_EQ(*ParseKvDType("f32"), KvDType::kF32);
  EXPECT_EQ(*ParseKvDType("bf16"), KvDType::kBF16);
  for (const char* bad : {"", "BF16", "fp16", "f16", "bfloat16", "q8_0", "f32 "}) {
    const absl::StatusOr<KvDType> t = ParseKvDType(bad);
    ASSERT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_TRUE(absl::StrContains(t.status().message(), "is not one of auto, f32, bf16"))
        << t.status();
  }
  for (KvDType t : {KvDType::kAuto, KvDType::kF32, KvDType::kBF16}) {
    EXPECT_EQ(*ParseKvDType(KvDTypeName(t)), t);
  }
}

TEST(KvDType, AutoIsF32ForF32WeightsAndBf16ForTheRest) {
  EXPECT_EQ(ResolveKvDType(KvDType::kAuto, DType::kF32), KvDType::kF32);
  EXPECT_EQ(ResolveKvDType(KvDType::kAuto, DType::kBF16), KvDType::kBF16);
  EXPECT_EQ(ResolveKvDType(KvDType::kAuto, DType::kF16), KvDType::kBF16);
  EXPECT_EQ(ResolveKvDType(KvDType::kAuto, DType::kQ8_0), KvDType::kBF16);
  // An explicit choice stands whatever the weights.
  EXPECT_EQ(ResolveKvDType(KvDType::kF32, DType::kBF16), KvDType::kF32);
  EXPECT_EQ(ResolveKvDType(KvDType::kBF16, DType::kF32), KvDType::kBF16);
}

// A runner built with the default options on real checkpoints: F32 pages for an F32 one, BF16
// (half the bytes for the same pages) for a BF16 one.
TEST(KvDType, RunnerDefaultFollowsTheCheckpoint) {
  ThreadPool pool(1);
  RunnerOptions o;
  o.max_context = 64;
  o.num_slots = 2;
  size_t bytes[2] = {0, 0};
  int i = 0;
  for (DType dtype : {DType::kF32, DType::kBF16}) {
    testing::TempDir dir;
    const ModelConfig c = testing::WriteTinyModel(dir.path(), dtype);
    auto weights = ModelWeights::Load(dir.path());
    ASSERT_TRUE(weights.ok()) << weights.status();
    auto runner = ModelRunner::Create(**weights, pool, o);
    ASSERT_TRUE(runner.ok()) << runner.status();
    EXPECT_EQ((*runner)->options().kv_dtype, dtype == DType::kF32 ? KvDType::kF32 : KvDType::kBF16);
    EXPECT_EQ((*runner)->kv_cache().dtype(), (*runner)->options().kv_dtype);
    // 2 slots × 64 positions, 16 per page: 8 pages of every layer's keys and values.
    const size_t elements =
        size_t{2} * 8 * 16 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim();
    bytes[i++] = (*runner)->kv_cache_bytes();
    EXPECT_EQ(bytes[i - 1], elements * (dtype == DType::kF32 ? 4 : 2));
  }
  EXPECT_EQ(bytes[0], 2 * bytes[1]);
}

// KvCache::Write rounds to nearest even, ties to the even mantissa: expectations written out
// by hand as bit patterns, read back through the View the kernels get.
TEST(KvDType, WriterRoundsToNearestEven) {
  ModelConfig c = *PresetConfig("tiny");
  BatchLimits l;
  l.num_slots = 1;
  l.max_context = 8;
  l.kv_page_tokens = 4;
  l.kv_dtype = KvDType::kBF16;
  l = *l.Resolve(c);
  KvCache cache(c, l, /*num_pages=*/2);
  const int64_t row = cache.row_size(), hd = c.head_dim();
  ASSERT_GE(hd, 5);
  // Position 5 (page 1, row 1): the first head's first elements carry the cases.
  const float tie_down = 1.0f + std::ldexp(1.0f, -8);        // halfway 1 and 1+2^-7: to 1
  const float tie_up = 1.0f + 3 * std::ldexp(1.0f, -8);      // halfway 1+2^-7 and 1+2^-6: up
  const float above_tie = tie_down + std::ldexp(1.0f, -20);  // just past halfway: up
  const float exact = -2.5f;                                 // representable: unchanged
  const float below_tie = -(1.0f + std::ldexp(1.0f, -8) - std::ldexp(1.0f, -20));  // down
  std::vector<float> k(row, 0.0f), v(row, 0.0f);
  k[0] = tie_down, k[1] = tie_up, k[2] = above_tie, k[3] = exact, k[4] = below_tie;
  v[0] = tie_up, v[1] = exact;
  const std::vector<int32_t> ids = {0}, slots = {0}, pos = {5};
  ASSERT_TRUE(cache.blocks().Grow(0, 6).ok());  // pages for positions [0, 6)
  cache.Write(/*layer=*/1, ForwardBatch{ids, slots, pos, {}}, k.data(), v.data());
  const ops::KvPages view = cache.View(1, 0, 0);
  ASSERT_EQ(view.dtype, DType::kBF16);
  const uint16_t* key = view.Key<uint16_t>(5);
  EXPECT_EQ(key[0], 0x3f80);
  EXPECT_EQ(key[1], 0x3f82);
  EXPECT_EQ(key[2], 0x3f81);
  EXPECT_EQ(key[3], 0xc020);
  EXPECT_EQ(key[4], 0xbf80);
  EXPECT_EQ(view.Value<uint16_t>(5)[0], 0x3f82);
  EXPECT_EQ(view.Value<uint16_t>(5)[1], 0xc020);
  EXPECT_EQ(cache.NumBytes(), size_t{2} * c.num_hidden_layers * 2 * 4 * row * 2);
}

// Every MoE layer's routed experts for every token of the Forwards since the last Clear, each
// token's as a sorted set.
class RoutingRecorder : public RoutingObserver {
 public:
  void OnRouting(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                 const float*) override {
    if (static_cast<int64_t>(tokens_.size()) <= layer) tokens_.resize(layer + 1);
    for (int64_t t = 0; t < T; ++t) {
      std::vector<int32_t> set(experts + t * k, experts + (t + 1) * k);
      std::sort(set.begin(), set.end());
      tokens_[layer].push_back(std::move(set));
    }
  }
  void Clear() { tokens_.clear(); }
  // Whether token t chose the same experts in every layer here as in `other`.
  bool SameAs(const RoutingRecorder& other, size_t t) const {
    for (size_t l = 0; l < tokens_.size(); ++l) {
      if (tokens_[l].empty()) continue;
      if (tokens_[l][t] != other.tokens_[l][t]) return false;
    }
    return true;
  }

 private:
  std::vector<std::vector<std::vector<int32_t>>> tokens_;  // [layer][token] → experts
};

// The BF16 cache against the F32 cache on the small preset (BF16 weights, so both runners read
// the same weights): a 40-token prompt, then 24 greedy steps, every step fed the F32 runner's
// token so that both see the same sequence throughout.
//
// The bound. A BF16 element is its fp32 value within a relative 2^-9 (round to nearest). In one
// attention, that moves each score by at most 2^-9 · scale · Σ|q_d·k_d| and each value row by
// 2^-9 of itself; the output is then off by a few 2^-9 relative to the rows it mixes, and the
// residual stream carries each layer's error on, diluted by everything else added to it. The
// issue's acceptance bound, logits within 1e-2 relative L2 (≈ 5 · 2^-9) and top-1 agreement of
// at least 99%, is what this checks, at every position whose routing is the same in both
// runners. Where a gate's top-k was a near-tie the perturbation may swap one expert for
// another: a discrete change, not a rounding error (fp32 against fp64 does the same at a
// closer tie). Those positions are counted (they must be rare) and held to the top-1 check
// only. A top-1 token that differs must be a near-tie of the F32 logits: its F32 logit within
// twice the largest logit difference of the top one. And the two runners must differ at all
// (the BF16 path is really taken): above 1e-6.
TEST(KvDType, Bf16CacheStaysWithinBoundOfF32OnTheSmallPreset) {
  testing::TempDir dir;
  const ModelConfig config = *PresetConfig("small");
  ASSERT_TRUE(WriteRandomCheckpoint(config, {DType::kBF16, 29, 1}, dir.path()).ok());
  auto weights = ModelWeights::Load(dir.path(), WeightSelection::Everything());
  ASSERT_TRUE(weights.ok()) << weights.status();
  ThreadPool pool(2);
  RunnerOptions o;
  o.max_context = 128;
  o.max_batch_tokens = 64;
  o.kv_dtype = KvDType::kF32;
  auto f32 = ModelRunner::Create(**weights, pool, o);
  o.kv_dtype = KvDType::kBF16;
  auto bf16 = ModelRunner::Create(**weights, pool, o);
  ASSERT_TRUE(f32.ok() && bf16.ok());
  ASSERT_EQ((*bf16)->kv_cache().dtype(), KvDType::kBF16);
  RoutingRecorder routes_a, routes_b;
  (*f32)->set_routing_observer(&routes_a);
  (*bf16)->set_routing_observer(&routes_b);

  const int64_t V = config.vocab_size;
  std::mt19937 rng(11);
  std::vector<int32_t> seq(40);
  for (int32_t& id : seq) id = 2 + static_cast<int32_t>(rng() % (V - 2));

  double worst_rel = 0, smallest_rel = 1, worst_flip_rel = 0;
  int64_t agree = 0, compared = 0, ties = 0, flips = 0;
  // Logits a (F32 KV) and b (BF16 KV) of the token at row `token` of the last Forward.
  auto compare = [&](const float* a, const float* b, const std::string& where, size_t token) {
    double num = 0, den = 0, max_diff = 0;
    for (int64_t v = 0; v < V; ++v) {
      const double d = static_cast<double>(b[v]) - a[v];
      num += d * d;
      den += static_cast<double>(a[v]) * a[v];
      max_diff = std::max(max_diff, std::fabs(d));
    }
    const double rel = std::sqrt(num / den);
    smallest_rel = std::min(smallest_rel, rel);
    if (routes_a.SameAs(routes_b, token)) {
      worst_rel = std::max(worst_rel, rel);
      EXPECT_LE(rel, 1e-2) << where;
    } else {
      ++flips;
      worst_flip_rel = std::max(worst_flip_rel, rel);
    }
    const int32_t top_a = ArgMax(a, V), top_b = ArgMax(b, V);
    ++compared;
    if (top_a == top_b) {
      ++agree;
    } else {
      ++ties;
      EXPECT_LE(a[top_a] - a[top_b], 2 * max_diff)
          << where << ": BF16 picks " << top_b << ", F32 " << top_a << ", not a near-tie";
    }
  };

  // Prefill: logits at every position (the attend_causal path).
  const int64_t P = static_cast<int64_t>(seq.size());
  std::vector<int32_t> slots(P, 0), pos(P), rows(P);
  std::iota(pos.begin(), pos.end(), 0);
  std::iota(rows.begin(), rows.end(), 0);
  std::vector<float> la(P * V), lb(P * V);
  ASSERT_TRUE((*f32)->Forward({seq, slots, pos, rows}, la.data()).ok());
  ASSERT_TRUE((*bf16)->Forward({seq, slots, pos, rows}, lb.data()).ok());
  for (int64_t p = 0; p < P; ++p) {
    compare(la.data() + p * V, lb.data() + p * V, "prompt position " + std::to_string(p), p);
  }
  // Decode (the attend path), the F32 runner's greedy token fed to both.
  std::vector<float> a(V), b(V);
  int32_t next = ArgMax(la.data() + (P - 1) * V, V);
  for (int step = 0; step < 24; ++step) {
    seq.push_back(next);
    const std::vector<int32_t> id = {next}, slot = {0}, at = {static_cast<int32_t>(seq.size() - 1)},
                               row = {0};
    routes_a.Clear();
    routes_b.Clear();
    ASSERT_TRUE((*f32)->Forward({id, slot, at, row}, a.data()).ok());
    ASSERT_TRUE((*bf16)->Forward({id, slot, at, row}, b.data()).ok());
    compare(a.data(), b.data(), "decode step " + std::to_string(step), 0);
    next = ArgMax(a.data(), V);
  }
  std::printf(
      "[bf16 vs f32 KV, small preset] %lld positions: rel-L2 %.2e..%.2e where routing is the "
      "same; %lld with an expert swapped at a gate near-tie (rel-L2 up to %.2e); top-1 "
      "agreement %lld/%lld (%lld near-ties)\n",
      static_cast<long long>(compared), smallest_rel, worst_rel, static_cast<long long>(flips),
      worst_flip_rel, static_cast<long long>(agree), static_cast<long long>(compared),
      static_cast<long long>(ties));
  EXPECT_GT(smallest_rel, 1e-6) << "BF16 pages gave the F32 logits: was BF16 used?";
  EXPECT_GE(agree, compared * 99 / 100);
  EXPECT_LE(flips, compared / 10) << "experts swapped at gate near-ties should be rare";
}

}  // namespace
}  // namespace dsmoe
