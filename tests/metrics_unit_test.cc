// The services' metric instruments against hand-computed values: expert-load counting, the
// imbalance gauge over its window (with a clock the test moves), code counters, the endpoint,
// and the cost of counting one MoE layer's routing (the hot path).
#include <gtest/gtest.h>
#include <prometheus/metric_family.h>

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "attention-server/attention_metrics.h"
#include "core/rpc/metrics.h"

namespace dsmoe {
namespace {

// The value of the series `name{labels}` (model label aside) in the registry, or -1 if absent.
double Value(rpc::MetricsRegistry& registry, const std::string& name,
             const prometheus::Labels& labels) {
  for (const prometheus::MetricFamily& f : registry.registry().Collect()) {
    if (f.name != name) continue;
    for (const prometheus::ClientMetric& m : f.metric) {
      bool match = true;
      for (const auto& [k, v] : labels) {
        bool found = false;
        for (const auto& l : m.label) found |= (l.name == k && l.value == v);
        match &= found;
      }
      if (!match) continue;
      if (f.type == prometheus::MetricType::Counter) return m.counter.value;
      if (f.type == prometheus::MetricType::Gauge) return m.gauge.value;
      if (f.type == prometheus::MetricType::Histogram)
        return static_cast<double>(m.histogram.sample_count);
    }
  }
  return -1;
}

ModelConfig SmallMoe() {
  ModelConfig c;
  c.num_hidden_layers = 4;
  c.first_k_dense_replace = 1;  // layer 0 dense
  c.moe_layer_freq = 1;
  c.n_routed_experts = 8;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 2;
  return c;
}

struct FakeClock {
  int64_t ns = 1'000'000'000'000;
  std::function<int64_t()> fn() {
    return [this] { return ns; };
  }
};

TEST(ExpertLoadMetrics, CountsEveryAssignmentPerLayerAndExpert) {
  rpc::MetricsRegistry registry("m");
  FakeClock clock;
  ExpertLoadMetrics load(registry, SmallMoe(), {60, 6, clock.fn()});
  // 3 tokens, top-2: experts [1,2], [2,5], [2,1].
  const int32_t experts[] = {1, 2, 2, 5, 2, 1};
  const float weights[] = {0.6f, 0.4f, 0.5f, 0.5f, 0.7f, 0.3f};
  load.OnRouting(2, 3, 2, experts, weights);
  load.OnRouting(2, 3, 2, experts, weights);
  load.OnRouting(1, 1, 2, experts, weights);  // token 0 only: [1,2]
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "2"}, {"expert", "1"}}), 4);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "2"}, {"expert", "2"}}), 6);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "2"}, {"expert", "5"}}), 2);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "2"}, {"expert", "0"}}), 0);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "1"}, {"expert", "1"}}), 1);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "1"}, {"expert", "5"}}), 0);
  EXPECT_EQ(Value(registry, "dsmoe_shared_expert_tokens_total", {{"layer", "2"}}), 6);
  EXPECT_EQ(Value(registry, "dsmoe_shared_expert_tokens_total", {{"layer", "1"}}), 1);
  // The dense layer has no series at all; every MoE layer has one per routed expert.
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "0"}}), -1);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "3"}, {"expert", "7"}}), 0);
}

TEST(ExpertLoadMetrics, NoSharedSeriesWithoutSharedExperts) {
  ModelConfig c = SmallMoe();
  c.n_shared_experts = 0;
  rpc::MetricsRegistry registry("m");
  ExpertLoadMetrics load(registry, c);
  const int32_t experts[] = {0, 1};
  load.OnRouting(1, 1, 2, experts, nullptr);
  EXPECT_EQ(Value(registry, "dsmoe_shared_expert_tokens_total", {{"layer", "1"}}), -1);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "1"}, {"expert", "0"}}), 1);
}

TEST(ExpertLoadMetrics, ImbalanceIsMaxOverMeanOfTheWindow) {
  rpc::MetricsRegistry registry("m");
  FakeClock clock;
  ExpertLoadMetrics load(registry, SmallMoe(), {60, 6, clock.fn()});
  load.UpdateImbalance();
  EXPECT_EQ(Value(registry, "dsmoe_expert_load_imbalance", {{"layer", "1"}}),
            0);  // nothing routed yet
  // 8 experts; 8 assignments all to expert 3 → max 8, mean 1.
  std::vector<int32_t> hot(8, 3);
  load.OnRouting(1, 4, 2, hot.data(), nullptr);
  // Layer 2 perfectly even: one assignment per expert.
  std::vector<int32_t> even = {0, 1, 2, 3, 4, 5, 6, 7};
  load.OnRouting(2, 4, 2, even.data(), nullptr);
  load.UpdateImbalance();
  EXPECT_DOUBLE_EQ(Value(registry, "dsmoe_expert_load_imbalance", {{"layer", "1"}}), 8.0);
  EXPECT_DOUBLE_EQ(Value(registry, "dsmoe_expert_load_imbalance", {{"layer", "2"}}), 1.0);
  // 30 s later layer 1 gets even load too: the window holds both.
  clock.ns += 30'000'000'000;
  load.OnRouting(1, 4, 2, even.data(), nullptr);
  load.UpdateImbalance();
  // counts: expert 3 → 9, others → 1; total 16, mean 2 → 4.5.
  EXPECT_DOUBLE_EQ(Value(registry, "dsmoe_expert_load_imbalance", {{"layer", "1"}}), 4.5);
  EXPECT_EQ(load.WindowCounts(1)[3], 9);
  // 45 s after that the hot batch has left the 60 s window, the even one has not.
  clock.ns += 45'000'000'000;
  load.UpdateImbalance();
  EXPECT_DOUBLE_EQ(Value(registry, "dsmoe_expert_load_imbalance", {{"layer", "1"}}), 1.0);
  EXPECT_EQ(load.WindowCounts(1)[3], 1);
  // Much later nothing is left; the counters keep everything.
  clock.ns += 600'000'000'000;
  load.UpdateImbalance();
  EXPECT_EQ(Value(registry, "dsmoe_expert_load_imbalance", {{"layer", "1"}}), 0);
  EXPECT_EQ(Value(registry, "dsmoe_expert_tokens_total", {{"layer", "1"}, {"expert", "3"}}), 9);
}

TEST(ExpertLoadMetrics, ScrapeRunsTheImbalanceHook) {
  rpc::MetricsRegistry registry("m");
  AttentionMetrics metrics(registry, SmallMoe());
  std::vector<int32_t> hot(4, 0);
  metrics.expert_load().OnRouting(3, 2, 2, hot.data(), nullptr);
  const std::string text = registry.Text();  // what a scrape collects
  EXPECT_NE(text.find("dsmoe_expert_load_imbalance{model=\"m\",layer=\"3\"} 8"), std::string::npos)
      << text;
}

TEST(Metrics, CodeCountersCoverEveryGrpcCode) {
  rpc::MetricsRegistry registry("m");
  auto counters = rpc::AddCodeCounters(registry.Counter("dsmoe_x_total", "x"), {{"method", "M"}});
  rpc::CountCode(counters, 0);
  rpc::CountCode(counters, 3);
  rpc::CountCode(counters, 3);
  rpc::CountCode(counters, 99);  // unknown codes count as UNKNOWN
  EXPECT_EQ(Value(registry, "dsmoe_x_total", {{"code", "OK"}}), 1);
  EXPECT_EQ(Value(registry, "dsmoe_x_total", {{"code", "INVALID_ARGUMENT"}}), 2);
  EXPECT_EQ(Value(registry, "dsmoe_x_total", {{"code", "UNKNOWN"}}), 1);
  EXPECT_EQ(Value(registry, "dsmoe_x_total", {{"code", "UNAUTHENTICATED"}}), 0);
  EXPECT_EQ(rpc::GrpcCodeName(14), "UNAVAILABLE");
  EXPECT_EQ(rpc::GrpcCodeName(4), "DEADLINE_EXCEEDED");
}

TEST(Metrics, EveryFamilyCarriesTheModelLabel) {
  rpc::MetricsRegistry registry("deepseek-moe-16b", {{"expert_server", "3"}});
  registry.Counter("dsmoe_a_total", "a").Add({}).Increment();
  const std::string text = registry.Text();
  EXPECT_NE(text.find("dsmoe_a_total{"), std::string::npos);
  EXPECT_NE(text.find("model=\"deepseek-moe-16b\""), std::string::npos) << text;
  EXPECT_NE(text.find("expert_server=\"3\""), std::string::npos) << text;
  EXPECT_EQ(rpc::ModelNameFromPath("/models/deepseek-moe-16b/"), "deepseek-moe-16b");
  EXPECT_EQ(rpc::ModelNameFromPath("out/tiny"), "tiny");
}

TEST(Metrics, ServeBindsAnEphemeralPortAndReportsErrorsAsStatus) {
  rpc::MetricsRegistry registry("m");
  auto port = registry.Serve("127.0.0.1:0");
  ASSERT_TRUE(port.ok()) << port.status();
  EXPECT_GT(*port, 0);
  EXPECT_FALSE(registry.Serve("127.0.0.1:0").ok());  // once only
  rpc::MetricsRegistry other("m");
  auto taken = other.Serve("127.0.0.1:" + std::to_string(*port));  // the port is in use
  EXPECT_FALSE(taken.ok());
  EXPECT_EQ(taken.status().code(), absl::StatusCode::kUnavailable);
  registry.StopServing();
}

// The hot path: counting one MoE layer's routing of a full batch (256 tokens, top-6 of 64, the
// DeepSeekMoE 16B shape). Reports the cost; fails only if it is absurdly slow.
TEST(ExpertLoadMetrics, CostOfCountingOneLayer) {
  ModelConfig c = SmallMoe();
  c.n_routed_experts = 64;
  c.num_experts_per_tok = 6;
  rpc::MetricsRegistry registry("m");
  ExpertLoadMetrics load(registry, c);
  const int64_t T = 256, k = 6;
  std::vector<int32_t> experts(T * k);
  std::mt19937 rng(1);
  for (auto& e : experts) e = static_cast<int32_t>(rng() % 64);
  const int iters = 20000;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) load.OnRouting(1 + i % 3, T, k, experts.data(), nullptr);
  const double ns =
      std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count() /
      iters;
  std::printf("OnRouting(T=256, k=6, E=64): %.0f ns per layer, %.2f ns per assignment\n", ns,
              ns / (T * k));
  EXPECT_LT(ns, 1e6);
  double total = 0;
  for (int e = 0; e < 64; ++e)
    total += Value(registry, "dsmoe_expert_tokens_total",
                   {{"layer", "1"}, {"expert", std::to_string(e)}});
  EXPECT_EQ(total, static_cast<double>((iters + 2) / 3) * T * k);
}

}  // namespace
}  // namespace dsmoe
