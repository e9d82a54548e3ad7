// The attention server's metrics (docs/metrics.md): the expert load its router chooses, and the
// scheduler's queue, batch, KV-cache and token counts.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "core/model/config.h"
#include "core/model/forward_profile.h"
#include "core/model/model_runner.h"
#include "core/rpc/metrics.h"
#include "router/load_window.h"

namespace dsmoe {

// The imbalance gauge (and the placement planner) look at the routing of the last
// window_seconds (router/load_window.h).
using ExpertLoadOptions = router::LoadWindowOptions;

// Counts every routed (token, expert) assignment the gate makes, per (layer, expert):
// dsmoe_expert_tokens_total; the tokens through each MoE layer's shared experts; and, per MoE
// layer, the load imbalance over the recent window: max over experts / mean over experts of the
// tokens routed to each (1 = perfectly even; 0 = nothing routed in the window).
//
// Thread-safety: OnRouting is called by the runner's owner thread only (it uses a scratch
// buffer); UpdateImbalance and WindowCounts may run on any thread concurrently with it (the
// window is atomics; a bucket being recycled while read can make one reading slightly off).
class ExpertLoadMetrics final : public RoutingObserver {
 public:
  ExpertLoadMetrics(rpc::MetricsRegistry& registry, const ModelConfig& config,
                    ExpertLoadOptions options = {});

  void OnRouting(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                 const float* weights) override;

  // Sets every MoE layer's imbalance gauge from the window (runs before each scrape).
  void UpdateImbalance();
  // Tokens routed to each expert of `layer` within the window ([n_routed_experts]).
  std::vector<int64_t> WindowCounts(int64_t layer) const { return window_.Counts(layer); }
  const router::LoadWindow& window() const { return window_; }

 private:
  struct Layer {
    bool moe = false;
    std::vector<prometheus::Counter*> expert_tokens;  // [E]
    prometheus::Counter* shared_tokens = nullptr;     // null without shared experts
    prometheus::Gauge* imbalance = nullptr;
  };

  int64_t num_experts_;
  router::LoadWindow window_;
  std::vector<Layer> layers_;    // [num_hidden_layers]
  std::vector<int64_t> counts_;  // [E] scratch of OnRouting
};

// The scheduler's instruments (children looked up once; updating is an atomic add or store).
struct SchedulerMetrics {
  explicit SchedulerMetrics(rpc::MetricsRegistry& registry);

  prometheus::Gauge* running;                 // sequences holding a KV-cache slot
  prometheus::Gauge* waiting;                 // accepted, waiting for a slot
  prometheus::Gauge* kv_cache_usage;          // KV-cache pages in use / pages
  prometheus::Gauge* kv_pages_used;           // KV-cache pages held by sequences
  prometheus::Gauge* kv_pages_free;           // KV-cache pages free (incl. cached, unheld)
  prometheus::Counter* preemptions;           // sequences preempted (pages freed, requeued)
  prometheus::Counter* prefix_cache_queries;  // tokens looked up in the prefix cache
  prometheus::Counter* prefix_cache_hits;     // ... of them found cached
  prometheus::Gauge* prefix_cache_pages;      // pages in the prefix index
  prometheus::Histogram* queue_time;          // submit → admitted into a slot
  prometheus::Histogram* forward_time;        // one forward pass (one scheduler step)
  prometheus::Histogram* batch_tokens;        // tokens per forward pass
  prometheus::Counter* prompt_tokens;         // prompt tokens prefilled
  prometheus::Counter* generation_tokens;     // tokens sampled
  prometheus::Counter* finished_stop;         // sequences finished by a stop token
  prometheus::Counter* finished_length;       // ... by max_tokens or the context
  prometheus::Counter* finished_abort;        // ... cancelled, failed or shut down
  // Seconds of forward passes by phase (ForwardPhase), where the runner measures them.
  std::array<prometheus::Counter*, static_cast<size_t>(ForwardPhase::kCount)> phase_seconds;
};

// Everything an attention server exports, on one registry.
// Thread-safe as its parts are (see above).
class AttentionMetrics {
 public:
  AttentionMetrics(rpc::MetricsRegistry& registry, const ModelConfig& config,
                   ExpertLoadOptions options = {});
  ExpertLoadMetrics& expert_load() { return expert_load_; }
  SchedulerMetrics& scheduler() { return scheduler_; }

 private:
  ExpertLoadMetrics expert_load_;
  SchedulerMetrics scheduler_;
};

}  // namespace dsmoe
