// The router library: placement files with versions and shares, the load window, the placement
// planner against an exhaustive optimum and against DeepSeek EPLB's baseline, and dispatch
// splitting replicated experts' tokens by share.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "router/device_limit.h"
#include "router/dispatch.h"
#include "router/load_window.h"
#include "router/placement.h"
#include "router/planner.h"

namespace dsmoe::router {
namespace {

ModelConfig SmallMoe(int64_t experts = 8) {
  ModelConfig c;
  c.num_hidden_layers = 3;
  c.first_k_dense_replace = 1;
  c.moe_layer_freq = 1;
  c.n_routed_experts = experts;
  c.num_experts_per_tok = 2;
  c.hidden_size = 16;
  return c;
}

// --- Placement ---------------------------------------------------------------------------

TEST(Placement, JsonKeepsVersionAndSharesAndChecksThem) {
  const ModelConfig c = SmallMoe(2);
  const std::string text =
      R"({"version": 7, "num_servers": 2, "layers": [
          {"layer": 1, "servers": [[0, 1], [1]], "shares": [[3, 1], [1]]},
          {"layer": 2, "servers": [[1], [0]]}]})";
  auto p = Placement::FromJson(text, c, "p.json");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->version(), 7u);
  EXPECT_DOUBLE_EQ(p->Shares(1, 0)[0], 0.75);
  EXPECT_DOUBLE_EQ(p->Shares(1, 0)[1], 0.25);
  EXPECT_DOUBLE_EQ(p->Shares(2, 1)[0], 1.0);
  auto again = Placement::FromJson(p->ToJson(), c, "again");
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_TRUE(again->SameAs(*p));
  EXPECT_EQ(again->version(), 7u);
  // Without version or shares: version 1, equal shares (files written before either existed).
  auto old = Placement::FromJson(
      R"({"num_servers": 2, "layers": [{"layer": 1, "servers": [[0, 1], [1]]},
                                        {"layer": 2, "servers": [[1], [0]]}]})",
      c, "old");
  ASSERT_TRUE(old.ok()) << old.status();
  EXPECT_EQ(old->version(), 1u);
  EXPECT_DOUBLE_EQ(old->Shares(1, 0)[1], 0.5);
  for (
      const char* bad : {
          R"({"num_servers": 2, "layers": [{"layer": 1, "servers": [[0, 1], [1]], "shares": [[1], [1]]}, {"layer": 2, "servers": [[1], [0]]}]})",
          R"({"num_servers": 2, "layers": [{"layer": 1, "servers": [[0, 1], [1]], "shares": [[1, 0], [1]]}, {"layer": 2, "servers": [[1], [0]]}]})",
          R"({"version": -1, "num_servers": 2, "layers": [{"layer": 1, "servers": [[0], [1]]}, {"layer": 2, "servers": [[1], [0]]}]})",
      }) {
    auto r = Placement::FromJson(bad, c, "bad.json");
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(r.status().message().find("bad.json"), std::string::npos);
  }
}

// --- LoadWindow --------------------------------------------------------------------------

TEST(LoadWindow, CountsWithinTheWindowOnly) {
  int64_t now = 0;
  LoadWindow w({false, true}, 3, {10, 5, [&] { return now; }});
  const int64_t a[3] = {1, 2, 3};
  w.Add(1, a);
  w.Add(0, a);  // untracked: ignored
  now += 4'000'000'000;
  w.Add(1, a);
  EXPECT_EQ(w.Counts(1), (std::vector<int64_t>{2, 4, 6}));
  EXPECT_EQ(w.Counts(0), (std::vector<int64_t>{0, 0, 0}));
  now += 7'000'000'000;  // the first Add (t=0) has left the 10 s window, the second not
  EXPECT_EQ(w.Counts(1), (std::vector<int64_t>{1, 2, 3}));
  now += 20'000'000'000;
  EXPECT_EQ(w.Counts(1), (std::vector<int64_t>{0, 0, 0}));
}

// --- Planner -----------------------------------------------------------------------------

// Checks a layer plan from scratch and returns its largest per-server load, recomputed.
double CheckPlan(const LayerPlan& plan, const std::vector<double>& load, const PlannerOptions& o,
                 int slots) {
  const int E = static_cast<int>(load.size());
  EXPECT_EQ(static_cast<int>(plan.holders.size()), E);
  std::vector<double> server(o.num_servers, 0.0);
  std::vector<int> used(o.num_servers, 0);
  int physical = 0;
  for (int e = 0; e < E; ++e) {
    const auto& h = plan.holders[e];
    EXPECT_GE(static_cast<int>(h.size()), o.min_copies)
        << "expert " << e << " below the redundancy floor";
    EXPECT_EQ(std::set<int>(h.begin(), h.end()).size(), h.size())
        << "two replicas of expert " << e << " on one server";
    EXPECT_EQ(plan.shares[e].size(), h.size());
    double total = 0;
    for (size_t r = 0; r < h.size(); ++r) {
      EXPECT_GT(plan.shares[e][r], 0);
      total += plan.shares[e][r];
      server[h[r]] += load[e] * plan.shares[e][r];
      ++used[h[r]];
    }
    EXPECT_NEAR(total, 1.0, 1e-9);
    physical += static_cast<int>(h.size());
  }
  EXPECT_LE(physical, E * o.min_copies + o.num_replicas);
  for (int s = 0; s < o.num_servers; ++s) {
    EXPECT_LE(used[s], slots) << "server " << s << " over its slots";
    EXPECT_NEAR(server[s], plan.server_load[s], 1e-9 * (1 + server[s]));
  }
  return *std::max_element(server.begin(), server.end());
}

// The optimum with equal shares, by exhaustive search: every replica count vector within the
// budget (at most one replica per server) and every assignment of the replicas to servers.
double BruteForce(const std::vector<double>& load, int S, int C, int R) {
  const int E = static_cast<int>(load.size());
  double best = INFINITY;
  std::vector<int> r(E, 1);
  std::function<void(int, int)> counts = [&](int e, int left) {
    if (e == E) {
      std::vector<std::pair<int, double>> items;  // (expert, weight), heaviest first prunes
      for (int x = 0; x < E; ++x) {
        for (int k = 0; k < r[x]; ++k) items.push_back({x, load[x] / r[x]});
      }
      std::sort(items.begin(), items.end(), [](auto& a, auto& b) { return a.second > b.second; });
      std::vector<double> srv(S, 0.0);
      std::vector<int> cnt(S, 0);
      std::vector<std::set<int>> holds(S);
      std::function<void(size_t, double)> dfs = [&](size_t i, double cur) {
        if (cur >= best) return;
        if (i == items.size()) {
          best = cur;
          return;
        }
        for (int s = 0; s < S; ++s) {
          if (cnt[s] >= C || holds[s].count(items[i].first)) continue;
          srv[s] += items[i].second;
          ++cnt[s];
          holds[s].insert(items[i].first);
          dfs(i + 1, std::max(cur, srv[s]));
          srv[s] -= items[i].second;
          --cnt[s];
          holds[s].erase(items[i].first);
        }
      };
      dfs(0, 0.0);
      return;
    }
    for (int k = 1; k <= std::min(S, 1 + left); ++k) {
      r[e] = k;
      counts(e + 1, left - (k - 1));
    }
    r[e] = 1;
  };
  counts(0, R);
  return best;
}

std::vector<double> SkewedLoads(std::mt19937& rng, int E, double skew) {
  // Zipf-like: expert ranks shuffled, load ∝ 1 / rank^skew, plus noise.
  std::vector<int> rank(E);
  std::iota(rank.begin(), rank.end(), 1);
  std::shuffle(rank.begin(), rank.end(), rng);
  std::uniform_real_distribution<double> noise(0.8, 1.2);
  std::vector<double> load(E);
  for (int e = 0; e < E; ++e) load[e] = std::round(1000.0 * noise(rng) / std::pow(rank[e], skew));
  return load;
}

TEST(Planner, EqualSharePlansAgainstTheExhaustiveOptimum) {
  std::mt19937 rng(7);
  int planner_opt = 0, eplb_opt = 0, cases = 0;
  double worst_planner = 1, worst_eplb = 1;
  for (int trial = 0; trial < 150; ++trial) {
    const int S = 2 + trial % 3;                      // 2..4 servers
    const int E = 3 + (trial / 3) % 4;                // 3..6 experts
    const int R = (trial / 12) % 3;                   // 0..2 replicas
    const int C = (E + R + S - 1) / S + (trial % 2);  // just enough, or one spare
    const std::vector<double> load = SkewedLoads(rng, E, 0.5 + (trial % 5) * 0.4);
    PlannerOptions o{S, R, C, true, false};
    PlannerOptions eplb_o = o;
    eplb_o.refine = false;
    auto plan = PlanLayer(load, o);
    auto eplb = PlanLayerEplb(load, eplb_o);
    ASSERT_TRUE(plan.ok() && eplb.ok()) << plan.status() << eplb.status();
    const double got = CheckPlan(*plan, load, o, C);
    const double base = CheckPlan(*eplb, load, o, C);
    const double opt = BruteForce(load, S, C, std::min(R, S * C - E));
    ASSERT_GE(got, opt * (1 - 1e-9)) << "better than the optimum: the search or the check is wrong";
    EXPECT_LE(got, base * (1 + 1e-12)) << "trial " << trial;
    planner_opt += got <= opt * (1 + 1e-9);
    eplb_opt += base <= opt * (1 + 1e-9);
    worst_planner = std::max(worst_planner, got / opt);
    worst_eplb = std::max(worst_eplb, base / opt);
    ++cases;
  }
  std::printf(
      "exhaustive optimum reached: planner %d of %d (worst %.3f× optimum), EPLB %d "
      "(worst %.3f×)\n",
      planner_opt, cases, worst_planner, eplb_opt, worst_eplb);
  // Measured when written: planner 125 of 150 (worst 1.14×), EPLB 107 (worst 1.30×).
  EXPECT_GT(planner_opt, eplb_opt);
  EXPECT_GE(planner_opt, cases * 4 / 5);
  EXPECT_LE(worst_planner, 1.15);
}

TEST(Planner, NeverWorseThanEplbOnRandomSkewedLoads) {
  std::mt19937 rng(11);
  double sum_gain = 0, best_gain = 0;
  int better = 0, cases = 0;
  for (int trial = 0; trial < 200; ++trial) {
    const int S = 2 + trial % 7;                  // 2..8 servers
    const int E = 16 * (1 + trial % 4);           // 16..64 experts
    const int R = (trial / 4) % (S + 1) + S / 2;  // about one replica per server
    const std::vector<double> load = SkewedLoads(rng, E, 0.3 + (trial % 6) * 0.3);
    PlannerOptions o{S, R, 0, true, true};
    PlannerOptions eplb_o = o;
    eplb_o.refine = false;
    const int C = (E + R + S - 1) / S;
    auto plan = PlanLayer(load, o);
    auto eplb = PlanLayerEplb(load, eplb_o);
    ASSERT_TRUE(plan.ok() && eplb.ok());
    const double got = CheckPlan(*plan, load, o, C);
    const double base = CheckPlan(*eplb, load, o, C);
    ASSERT_LE(got, base * (1 + 1e-12)) << "trial " << trial << ": worse than EPLB";
    // Started from a round-robin placement (fewer moves preferred): still never worse.
    std::vector<std::vector<int>> now(E);
    for (int e = 0; e < E; ++e) now[e] = {e % S};
    auto sticky = PlanLayer(load, o, &now);
    ASSERT_TRUE(sticky.ok());
    ASSERT_LE(CheckPlan(*sticky, load, o, C), base * (1 + 1e-12)) << "trial " << trial;
    ASSERT_LE(sticky->max_load(), got * (1 + o.keep_tolerance) * (1 + 1e-12));
    const double gain = 1 - got / base;
    sum_gain += gain;
    best_gain = std::max(best_gain, gain);
    better += gain > 1e-9;
    ++cases;
  }
  std::printf("vs EPLB: lower maximum in %d of %d cases, by %.2f%% on average, %.1f%% at best\n",
              better, cases, 100 * sum_gain / cases, 100 * best_gain);
  EXPECT_GT(better, 0);
}

TEST(Planner, ReplicatesAHotExpertAndEvensTheServers) {
  // One expert carries as much as the other seven together: EPLB's replicas and the packing
  // should bring 4 servers within a few percent of the mean.
  std::vector<double> load = {700, 100, 100, 100, 100, 100, 100, 100};
  PlannerOptions o{4, 4, 0, true, true};
  auto plan = PlanLayer(load, o);
  ASSERT_TRUE(plan.ok());
  CheckPlan(*plan, load, o, 3);
  EXPECT_GE(plan->holders[0].size(), 3u);
  EXPECT_LE(Imbalance(plan->server_load), 1.02);
}

TEST(Planner, TheRedundancyFloorHoldsWhateverTheLoad) {
  // The issue's scenario: 2 servers, every expert started with 2 copies, a skewed load and the
  // default budget (one replica per server). The planner may not drop a copy to even the load.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 60; ++trial) {
    const int S = 2 + trial % 4;
    const int M = 1 + static_cast<int>(rng() % S);
    const int R = static_cast<int>(rng() % (2 * S + 1));
    std::vector<double> load(16);
    std::exponential_distribution<double> skew(0.05);
    for (double& l : load) l = skew(rng);
    PlannerOptions o{S, R, 0, true, true};
    o.min_copies = M;
    auto plan = PlanLayer(load, o);
    ASSERT_TRUE(plan.ok()) << plan.status();
    const int slots = (16 * M + R + S - 1) / S;
    CheckPlan(*plan, load, o, slots);
    auto eplb = PlanLayerEplb(load, o);
    ASSERT_TRUE(eplb.ok());
    CheckPlan(*eplb, load, o, slots);
    EXPECT_LE(plan->max_load(), eplb->max_load() * (1 + 1e-9));
  }
  // A floor above the number of servers cannot be kept on distinct servers: refused, saying so.
  PlannerOptions too_many{2, 0, 0};
  too_many.min_copies = 3;
  auto refused = PlanLayer({1, 2, 3}, too_many);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), testing::HasSubstr("min_copies 3"));
}

TEST(Planner, APlacementWithTwoCopiesKeepsThemAcrossAReplan) {
  const ModelConfig c = SmallMoe(8);
  auto current = Placement::Compute(c, 2, 2, Placement::Strategy::kRoundRobin);
  ASSERT_TRUE(current.ok());
  std::vector<std::vector<double>> hot(3, std::vector<double>(8, 1.0));
  hot[0].clear();
  hot[1][2] = 500;
  PlannerOptions o{2, 2, 0};
  o.min_copies = 2;
  auto plan = PlanPlacement(*current, hot, o);
  ASSERT_TRUE(plan.ok()) << plan.status();
  for (int l : {1, 2}) {
    for (int e = 0; e < 8; ++e) EXPECT_EQ(plan->Holders(l, e).size(), 2u) << l << ":" << e;
  }
}

TEST(Planner, BadInputIsAnError) {
  EXPECT_EQ(PlanLayer({}, {2, 0, 0}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanLayer({1, 2}, {0, 0, 0}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanLayer({1, -2}, {2, 0, 0}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(PlanLayer({1, 2, 3}, {1, 0, 2}).status().code(), absl::StatusCode::kInvalidArgument);
  // No load measured: an even spread.
  auto even = PlanLayer({0, 0, 0, 0}, {2, 0, 0});
  ASSERT_TRUE(even.ok());
  EXPECT_EQ(even->holders[0].size(), 1u);
}

TEST(Planner, PlacementKeepsWhatServersHoldAndBumpsTheVersion) {
  const ModelConfig c = SmallMoe(8);
  auto current = Placement::Compute(c, 4, 1, Placement::Strategy::kRoundRobin);
  ASSERT_TRUE(current.ok());
  // Even load and no replicas: the plan is a relabelled round-robin — nothing needs to move.
  std::vector<std::vector<double>> even(3, std::vector<double>(8, 10.0));
  even[0].clear();
  auto same = PlanPlacement(*current, even, {4, 0, 0});
  ASSERT_TRUE(same.ok()) << same.status();
  EXPECT_EQ(same->version(), current->version() + 1);
  for (int s = 0; s < 4; ++s) EXPECT_EQ(same->ExpertsOf(s), current->ExpertsOf(s)) << s;
  // A hot expert: it gets replicas, and the predicted imbalance drops.
  std::vector<std::vector<double>> hot = even;
  hot[1][5] = 200;
  hot[2][3] = 150;
  auto plan = PlanPlacement(*current, hot, {4, 4, 0});
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_GT(plan->Holders(1, 5).size(), 1u);
  for (int l : {1, 2}) {
    EXPECT_LT(Imbalance(ServerLoads(*plan, l, hot[l])),
              Imbalance(ServerLoads(*current, l, hot[l])));
  }
  // A skewed layer of 64 experts: most experts stay where they are.
  const ModelConfig big = SmallMoe(64);
  auto rr = Placement::Compute(big, 4, 1, Placement::Strategy::kRoundRobin);
  ASSERT_TRUE(rr.ok());
  std::mt19937 rng(5);
  std::vector<std::vector<double>> skewed(3);
  for (int l : {1, 2}) skewed[l] = SkewedLoads(rng, 64, 0.8);
  auto moved = PlanPlacement(*rr, skewed, {4, 4, 0});
  ASSERT_TRUE(moved.ok());
  int kept = 0, held = 0;
  for (int s = 0; s < 4; ++s) {
    const auto before = rr->ExpertsOf(s);
    const std::set<std::pair<int64_t, int64_t>> was(before.begin(), before.end());
    for (const auto& le : moved->ExpertsOf(s)) kept += was.count(le);
    held += static_cast<int>(before.size());
  }
  std::printf("skewed 64-expert layers: %d of %d placed experts stay put\n", kept, held);
  EXPECT_GE(kept, held * 3 / 4);
  for (int l : {1, 2}) {
    EXPECT_LT(Imbalance(ServerLoads(*moved, l, skewed[l])), 1.1);
  }
  EXPECT_EQ(PlanPlacement(*current, hot, {3, 4, 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// --- Device-limited routing --------------------------------------------------------------

std::vector<float> Logits(int64_t n, uint64_t seed) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::normal_distribution<float> d(0.0f, 2.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// With one copy per expert in contiguous blocks, the servers are group-limited greedy's groups:
// device-limited routing to M servers routes exactly as n_group = S, topk_group = M.
TEST(DeviceLimit, ContiguousPlacementRoutesAsGroupLimitedGreedy) {
  const ModelConfig c = [] {
    ModelConfig m = SmallMoe(64);
    m.num_experts_per_tok = 6;
    return m;
  }();
  const int64_t E = 64, k = 6, T = 300;
  for (int S : {2, 4, 8}) {
    auto placement = Placement::Compute(c, S, 1, Placement::Strategy::kContiguous);
    ASSERT_TRUE(placement.ok());
    for (int M = 1; M < S; ++M) {
      auto routing = DeviceLimitedRoutingFor(*placement, M);
      ASSERT_TRUE(routing.ok()) << routing.status();
      EXPECT_TRUE(routing->CheckCovers(c).ok());
      const std::vector<float> logits = Logits(T * E, 10 * S + M);
      std::vector<float> scratch(E), w_dl(T * k), w_gl(T * k);
      std::vector<int32_t> e_dl(T * k), e_gl(T * k);
      RouteTokens(routing->ForLayer({E, k, true}, 1), logits.data(), T, scratch.data(), e_dl.data(),
                  w_dl.data());
      RouteTokens({E, k, true, TopkMethod::kGroupLimitedGreedy, S, M}, logits.data(), T,
                  scratch.data(), e_gl.data(), w_gl.data());
      EXPECT_EQ(e_dl, e_gl) << "S " << S << " M " << M;
      EXPECT_EQ(w_dl, w_gl) << "S " << S << " M " << M;
    }
  }
}

// Round-robin with 2 copies: the membership is the placement's holders, layer by layer (each
// MoE layer's round-robin starts one server later).
TEST(DeviceLimit, MembershipFollowsEveryHolder) {
  const ModelConfig c = SmallMoe(8);
  auto placement = Placement::Compute(c, 4, 2, Placement::Strategy::kRoundRobin);
  ASSERT_TRUE(placement.ok());
  auto routing = DeviceLimitedRoutingFor(*placement, 1);
  ASSERT_TRUE(routing.ok());
  EXPECT_EQ(routing->ForLayer({8, 2, false}, 0).device_limit.max_servers, 0);  // dense
  for (int layer : {1, 2}) {
    const DeviceLimit d = routing->ForLayer({8, 2, false}, layer).device_limit;
    EXPECT_EQ(d.max_servers, 1);
    EXPECT_EQ(d.num_servers, 4);
    for (int e = 0; e < 8; ++e) {
      const uint64_t first = (e + layer - 1) % 4, second = (first + 1) % 4;
      EXPECT_EQ(d.expert_servers[e], (uint64_t{1} << first) | (uint64_t{1} << second))
          << "layer " << layer << " expert " << e;
    }
  }
}

TEST(DeviceLimit, RefusesALimitOutsideTheServers) {
  auto placement = Placement::Compute(SmallMoe(8), 4, 1, Placement::Strategy::kRoundRobin);
  ASSERT_TRUE(placement.ok());
  for (int M : {0, 5}) {
    const absl::Status s = DeviceLimitedRoutingFor(*placement, M).status();
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(s.message()), ::testing::HasSubstr("must be 1 to 4"));
  }
}

// --- Dispatch ----------------------------------------------------------------------------

TEST(Dispatch, SplitsAReplicatedExpertsTokensByShare) {
  const ModelConfig c = SmallMoe(2);
  // Layer 1: expert 0 on servers 0, 1, 2 with shares 1/2, 1/3, 1/6; expert 1 on server 2.
  auto p =
      Placement::FromHolders(3, {{}, {{0, 1, 2}, {2}}, {{0}, {1}}}, {{}, {{3, 2, 1}, {1}}, {}}, 2);
  ASSERT_TRUE(p.ok()) << p.status();
  DispatchPlanner a(*p), b(*p);
  std::vector<ServerWork> wa, wb;
  std::vector<int64_t> count(3, 0);
  std::mt19937 rng(3);
  for (int batch = 0; batch < 50; ++batch) {
    const int T = 1 + static_cast<int>(rng() % 13);
    std::vector<int32_t> experts(T * 2);
    std::vector<float> weights(T * 2, 0.5f);
    for (int t = 0; t < T; ++t) {
      experts[2 * t] = 0;
      experts[2 * t + 1] = 1;
    }
    ASSERT_TRUE(a.Plan(1, T, 2, experts.data(), weights.data(), &wa).ok());
    ASSERT_TRUE(b.Plan(1, T, 2, experts.data(), weights.data(), &wb).ok());
    int64_t total = 0;
    for (int s = 0; s < 3; ++s) {
      EXPECT_EQ(wa[s].expert, wb[s].expert) << "not deterministic";
      EXPECT_EQ(wa[s].token, wb[s].token);
      for (int32_t e : wa[s].expert) count[s] += e == 0;
    }
    for (int64_t x : count) total += x;
    // Smooth weighted round-robin stays within one assignment of the exact proportion.
    EXPECT_NEAR(count[0], total / 2.0, 1.0);
    EXPECT_NEAR(count[1], total / 3.0, 1.0);
    EXPECT_NEAR(count[2], total / 6.0, 1.0);
  }
  // A server marked down gets nothing; the others share its tokens.
  a.SetAvailable(0, false);
  std::vector<int32_t> e0(8, 0);
  std::vector<float> w0(8, 1.0f);
  ASSERT_TRUE(a.Plan(1, 8, 1, e0.data(), w0.data(), &wa).ok());
  EXPECT_TRUE(wa[0].empty());
  EXPECT_EQ(wa[1].token.size() + wa[2].token.size(), 8u);
  // Switching placements keeps availability; an expert without an available holder fails.
  auto q = Placement::FromHolders(3, {{}, {{0}, {2}}, {{0}, {1}}}, {}, 3);
  ASSERT_TRUE(q.ok());
  a.SetPlacement(*q);
  const absl::Status down = a.Plan(1, 8, 1, e0.data(), w0.data(), &wa);
  EXPECT_EQ(down.code(), absl::StatusCode::kUnavailable);
  // The message names the layer and every expert without a holder ([0]), and who held them.
  EXPECT_NE(down.message().find("routed experts of layer 1 [0]"), std::string::npos)
      << down.message();
  EXPECT_NE(down.message().find("expert servers holding them: 0"), std::string::npos)
      << down.message();
}

}  // namespace
}  // namespace dsmoe::router
