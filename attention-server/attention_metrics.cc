#include "attention-server/attention_metrics.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace dsmoe {

namespace {

std::vector<bool> MoeLayers(const ModelConfig& c) {
  std::vector<bool> out(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) out[l] = c.IsMoeLayer(l);
  return out;
}

}  // namespace

ExpertLoadMetrics::ExpertLoadMetrics(rpc::MetricsRegistry& registry, const ModelConfig& config,
                                     ExpertLoadOptions options)
    : num_experts_(std::max<int64_t>(config.n_routed_experts, 0)),
      window_(MoeLayers(config), num_experts_, std::move(options)) {
  auto& tokens = registry.Counter(
      "dsmoe_expert_tokens_total",
      "Routed (token, expert) assignments chosen by the gate, per MoE layer and routed expert");
  auto& shared = registry.Counter("dsmoe_shared_expert_tokens_total",
                                  "Tokens that passed through the shared experts, per MoE layer");
  auto& imbalance = registry.Gauge(
      "dsmoe_expert_load_imbalance",
      "Max over routed experts / mean over routed experts of the tokens routed in the "
      "recent window, per MoE layer (1 = even; 0 = none routed)");
  layers_.resize(static_cast<size_t>(config.num_hidden_layers));
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    if (!config.IsMoeLayer(l) || num_experts_ == 0) continue;
    Layer& L = layers_[l];
    L.moe = true;
    const std::string layer = std::to_string(l);
    for (int64_t e = 0; e < num_experts_; ++e) {
      L.expert_tokens.push_back(&tokens.Add({{"layer", layer}, {"expert", std::to_string(e)}}));
    }
    if (config.n_shared_experts > 0) L.shared_tokens = &shared.Add({{"layer", layer}});
    L.imbalance = &imbalance.Add({{"layer", layer}});
  }
  counts_.assign(static_cast<size_t>(num_experts_), 0);
}

void ExpertLoadMetrics::OnRouting(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                                  const float*) {
  if (layer < 0 || layer >= static_cast<int64_t>(layers_.size()) || !layers_[layer].moe) return;
  Layer& L = layers_[layer];
  // Count per expert first, so the shared counters see one atomic add per expert chosen in
  // this batch rather than one per assignment.
  std::fill(counts_.begin(), counts_.end(), 0);
  const int64_t n = T * k;
  for (int64_t i = 0; i < n; ++i) {
    const int32_t e = experts[i];
    if (e >= 0 && e < num_experts_) ++counts_[e];
  }
  window_.Add(layer, counts_.data());
  for (int64_t e = 0; e < num_experts_; ++e) {
    if (counts_[e] == 0) continue;
    L.expert_tokens[e]->Increment(static_cast<double>(counts_[e]));
  }
  if (L.shared_tokens != nullptr) L.shared_tokens->Increment(static_cast<double>(T));
}

void ExpertLoadMetrics::UpdateImbalance() {
  for (int64_t l = 0; l < static_cast<int64_t>(layers_.size()); ++l) {
    if (!layers_[l].moe) continue;
    const std::vector<int64_t> counts = WindowCounts(l);
    int64_t total = 0, max = 0;
    for (int64_t c : counts) {
      total += c;
      max = std::max(max, c);
    }
    const double mean = static_cast<double>(total) / static_cast<double>(num_experts_);
    layers_[l].imbalance->Set(total == 0 ? 0.0 : static_cast<double>(max) / mean);
  }
}

SchedulerMetrics::SchedulerMetrics(rpc::MetricsRegistry& r)
    : running(&r.Gauge("dsmoe_requests_running",
                       "Sequences holding a KV-cache slot (being prefilled or decoded)")
                   .Add({})),
      waiting(
          &r.Gauge("dsmoe_requests_waiting", "Sequences accepted and waiting for a KV-cache slot")
               .Add({})),
      kv_cache_usage(&r.Gauge("dsmoe_kv_cache_usage_ratio",
                              "KV-cache pages held by sequences / all pages (0..1)")
                          .Add({})),
      kv_pages_used(
          &r.Gauge("dsmoe_kv_cache_pages_used", "KV-cache pages held by sequences").Add({})),
      kv_pages_free(&r.Gauge("dsmoe_kv_cache_pages_free",
                             "KV-cache pages free (never used, or cached and held by nobody)")
                         .Add({})),
      preemptions(&r.Counter("dsmoe_preemptions_total",
                             "Sequences preempted when the KV cache ran out of pages (their "
                             "pages freed, requeued to be recomputed)")
                       .Add({})),
      prefix_cache_queries(&r.Counter("dsmoe_prefix_cache_queries_total",
                                      "Tokens looked up in the prefix cache when sequences were "
                                      "admitted (vllm:prefix_cache_queries)")
                                .Add({})),
      prefix_cache_hits(&r.Counter("dsmoe_prefix_cache_hits_total",
                                   "Of those, tokens found cached: their keys and values were "
                                   "not computed again (vllm:prefix_cache_hits)")
                             .Add({})),
      prefix_cache_pages(&r.Gauge("dsmoe_prefix_cache_pages",
                                  "KV-cache pages in the prefix cache (held by sequences or "
                                  "kept unreferenced until evicted)")
                              .Add({})),
      queue_time(
          &r.Histogram("dsmoe_request_queue_time_seconds",
                       "Time from a sequence's arrival to its admission into a KV-cache slot")
               .Add({}, rpc::TokenLatencyBuckets())),
      forward_time(&r.Histogram("dsmoe_forward_pass_seconds",
                                "Duration of one forward pass (one scheduler step)")
                        .Add({}, rpc::TokenLatencyBuckets())),
      batch_tokens(&r.Histogram("dsmoe_batch_tokens",
                                "Tokens in one forward pass (decode steps + prompt chunks)")
                        .Add({}, std::vector<double>{1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024,
                                                     2048, 4096})),
      prompt_tokens(&r.Counter("dsmoe_prompt_tokens_total", "Prompt tokens prefilled").Add({})),
      generation_tokens(
          &r.Counter("dsmoe_generation_tokens_total", "Tokens generated (sampled)").Add({})) {
  auto& finished = r.Counter(
      "dsmoe_sequences_finished_total",
      "Sequences the attention server finished, by finish_reason (abort: cancelled or failed)");
  finished_stop = &finished.Add({{"finish_reason", "stop"}});
  finished_length = &finished.Add({{"finish_reason", "length"}});
  finished_abort = &finished.Add({{"finish_reason", "abort"}});
  auto& phases = r.Counter("dsmoe_forward_phase_seconds_total",
                           "Time forward passes spent per phase (attention, shared_experts, "
                           "routed_wait: waiting for the routed experts, ...)");
  for (size_t p = 0; p < phase_seconds.size(); ++p) {
    phase_seconds[p] = &phases.Add({{"phase", ForwardPhaseName(static_cast<ForwardPhase>(p))}});
  }
}

AttentionMetrics::AttentionMetrics(rpc::MetricsRegistry& registry, const ModelConfig& config,
                                   ExpertLoadOptions options)
    : expert_load_(registry, config, std::move(options)), scheduler_(registry) {
  registry.AddCollectHook([this] { expert_load_.UpdateImbalance(); });
}

}  // namespace dsmoe
