// Live rebalancing of routed experts: plans a placement from the measured load and switches to
// it without stopping the scheduler.
//
// The change, in order (router/README.md):
//   1. every expert server is asked to hold old ∪ new experts (SetPlacement); new replicas load
//      in the background while the old placement keeps serving;
//   2. once every server reports the new version SERVING, the scheduler's loop thread swaps the
//      dispatcher's placement between two steps — a step sees the old or the new placement,
//      never both;
//   3. then no step can use the old replicas, and each server is told to hold only the new set.
// A failure before step 2 leaves the old placement in use (servers may hold extra experts until
// the next change, which states each server's whole set again).
//
// Thread-safe. One change at a time; the automatic mode runs on a thread of its own.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "attention-server/scheduler.h"
#include "core/rpc/metrics.h"
#include "core/util/log.h"
#include "expert-server/client/expert_dispatcher.h"
#include "router/load_window.h"
#include "router/planner.h"

namespace dsmoe {

struct RebalancerOptions {
  router::PlannerOptions planner;   // num_servers is taken from the placement
  double period_seconds = 0;        // automatic mode: look this often (0: off)
  double threshold = 1.15;          // ... and rebalance above this predicted server imbalance
  double min_gain = 0.03;           // ... if the plan lowers it by at least this fraction
  int64_t min_window_tokens = 512;  // ... and the window holds this many routed assignments
  std::chrono::milliseconds load_timeout{120000};  // for new replicas to serve
  // After each switch the placement in use is written here (atomically), so that a restarted
  // attention server starts from it rather than from its start-up placement. "": not kept.
  std::string state_file;
  // Called with the new placement on the scheduler's loop thread right after the dispatcher
  // switches to it, between the same two steps (the attention server's device-limited routing
  // follows it). Empty: nothing.
  std::function<void(const router::Placement&)> on_switch;
  // Where each change (and each automatic decision) is logged. Not owned; must outlive this.
  Logger* logger = DefaultLogger();
};

struct RebalanceOutcome {
  uint64_t version = 0;
  bool switched = false;
  double duration_seconds = 0, load_seconds = 0, switch_seconds = 0;
  int64_t experts_loaded = 0, experts_dropped = 0;
  std::vector<int64_t> layers;  // MoE layers
  std::vector<double> imbalance_before, imbalance_after;
};

struct RebalanceStatusReport {
  uint64_t succeeded = 0, failed = 0;
  double last_duration_seconds = 0, last_success_unix_seconds = 0;
  std::string last_error;
};

class Rebalancer {
 public:
  // Talks to the expert servers through `dispatcher.pool()`. REQUIRES: every argument outlives
  // this.
  Rebalancer(const ModelConfig& config, Scheduler& scheduler, ExpertDispatcher& dispatcher,
             const router::LoadWindow& window, rpc::MetricsRegistry* metrics,
             RebalancerOptions options);
  ~Rebalancer();  // stops the automatic mode

  // Assignments per (layer, expert) in the window, as loads ([layer][expert]).
  std::vector<std::vector<double>> WindowLoads() const;
  std::shared_ptr<const router::Placement> placement() const { return dispatcher_.placement(); }
  absl::StatusOr<router::Placement> Plan() const;
  // Predicted per-server imbalance of every MoE layer under `p` for `loads`.
  std::vector<double> Imbalances(const router::Placement& p,
                                 const std::vector<std::vector<double>>& loads) const;
  // Applies `target` (nullopt: Plan()) as described above. ABORTED if a change is running.
  // A given target that leaves some routed expert fewer copies than options.planner.min_copies
  // is refused (FAILED_PRECONDITION) unless `force`.
  absl::StatusOr<RebalanceOutcome> Apply(std::optional<router::Placement> target,
                                         bool keep_old_experts, bool force = false);
  RebalanceStatusReport status() const;
  bool automatic() const { return options_.period_seconds > 0; }
  const RebalancerOptions& options() const { return options_; }
  // Sets the live imbalance gauges (runs before each scrape).
  void UpdateGauges();

 private:
  absl::StatusOr<RebalanceOutcome> ApplyLocked(router::Placement target, bool keep_old_experts)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(apply_mu_);
  // Asks server s to hold `experts` as `version`.
  absl::Status SetServerPlacement(int s, uint64_t version,
                                  const std::vector<std::pair<int64_t, int64_t>>& experts,
                                  int64_t* loading, int64_t* dropping);
  // Polls until every server serves `version`.
  absl::Status WaitServing(uint64_t version);
  void Record(const absl::StatusOr<RebalanceOutcome>& outcome);
  void AutoLoop();

  const ModelConfig& config_;
  Scheduler& scheduler_;
  ExpertDispatcher& dispatcher_;
  ExpertServerPool& pool_;  // the dispatcher's
  const router::LoadWindow& window_;
  RebalancerOptions options_;
  std::vector<int64_t> moe_layers_;

  absl::Mutex apply_mu_;  // one change at a time
  mutable absl::Mutex status_mu_;
  RebalanceStatusReport status_ ABSL_GUARDED_BY(status_mu_);

  // Metrics (null without a registry).
  prometheus::Gauge* version_ = nullptr;
  prometheus::Histogram* duration_ = nullptr;
  prometheus::Histogram* switch_time_ = nullptr;
  prometheus::Gauge* last_success_ = nullptr;
  prometheus::Counter* succeeded_ = nullptr;
  prometheus::Counter* failed_ = nullptr;
  std::vector<prometheus::Gauge*> before_, after_, live_;  // [index in moe_layers_]

  absl::Mutex auto_mu_;
  absl::CondVar auto_cv_;
  bool stop_ ABSL_GUARDED_BY(auto_mu_) = false;
  std::atomic<bool> stopping_{false};  // ends a wait for loading replicas at shutdown
  std::thread auto_thread_;
};

}  // namespace dsmoe
