#include "attention-server/rebalancer.h"

#include <algorithm>
#include <set>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/io/mapped_file.h"

namespace dsmoe {

namespace {

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Max(const std::vector<double>& v) {
  return v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
}

}  // namespace

Rebalancer::Rebalancer(const ModelConfig& config, Scheduler& scheduler,
                       ExpertDispatcher& dispatcher, const router::LoadWindow& window,
                       rpc::MetricsRegistry* metrics, RebalancerOptions options)
    : config_(config),
      scheduler_(scheduler),
      dispatcher_(dispatcher),
      pool_(dispatcher.pool()),
      window_(window),
      options_(std::move(options)) {
  options_.planner.num_servers = dispatcher_.placement()->num_servers();
  for (int64_t l = 0; l < config.num_hidden_layers; ++l) {
    if (config.IsMoeLayer(l) && config.n_routed_experts > 0) moe_layers_.push_back(l);
  }
  if (metrics != nullptr) {
    rpc::MetricsRegistry& r = *metrics;
    version_ = &r.Gauge("dsmoe_placement_version",
                        "Version of the expert placement the attention server dispatches with")
                    .Add({});
    version_->Set(static_cast<double>(dispatcher_.placement()->version()));
    duration_ = &r.Histogram("dsmoe_rebalance_duration_seconds",
                             "Duration of a successful placement change: load new replicas, "
                             "switch between steps, drop old ones")
                     .Add({}, std::vector<double>{0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
                                                  30, 60, 120});
    switch_time_ =
        &r.Histogram("dsmoe_rebalance_switch_seconds",
                     "Time the switch to a new placement took on the scheduler's loop: the "
                     "step in flight finishing, then the swap")
             .Add({}, rpc::TokenLatencyBuckets());
    last_success_ = &r.Gauge("dsmoe_rebalance_last_success_timestamp_seconds",
                             "Unix time of the last successful placement change (0: never)")
                         .Add({});
    auto& total = r.Counter("dsmoe_rebalances_total",
                            "Placement changes attempted, by result (success, failure)");
    succeeded_ = &total.Add({{"result", "success"}});
    failed_ = &total.Add({{"result", "failure"}});
    auto& predicted = r.Gauge(
        "dsmoe_rebalance_imbalance",
        "Per-server load imbalance (max / mean over expert servers) of each MoE layer at the "
        "last placement change, predicted from the window's load: before and after");
    auto& live = r.Gauge("dsmoe_placement_imbalance",
                         "Per-server load imbalance (max / mean over expert servers) of each MoE "
                         "layer under the placement in use, from the window's load (0: none)");
    for (int64_t l : moe_layers_) {
      const std::string layer = std::to_string(l);
      before_.push_back(&predicted.Add({{"layer", layer}, {"when", "before"}}));
      after_.push_back(&predicted.Add({{"layer", layer}, {"when", "after"}}));
      live_.push_back(&live.Add({{"layer", layer}}));
    }
    r.AddCollectHook([this] { UpdateGauges(); });
  }
  if (options_.period_seconds > 0) auto_thread_ = std::thread([this] { AutoLoop(); });
}

Rebalancer::~Rebalancer() {
  stopping_ = true;
  {
    absl::MutexLock lock(&auto_mu_);
    stop_ = true;
  }
  auto_cv_.SignalAll();
  if (auto_thread_.joinable()) auto_thread_.join();
}

std::vector<std::vector<double>> Rebalancer::WindowLoads() const {
  std::vector<std::vector<double>> loads(static_cast<size_t>(config_.num_hidden_layers));
  for (int64_t l : moe_layers_) {
    const std::vector<int64_t> counts = window_.Counts(l);
    loads[l].assign(counts.begin(), counts.end());
  }
  return loads;
}

std::vector<double> Rebalancer::Imbalances(const router::Placement& p,
                                           const std::vector<std::vector<double>>& loads) const {
  std::vector<double> out;
  for (int64_t l : moe_layers_)
    out.push_back(router::Imbalance(router::ServerLoads(p, l, loads[l])));
  return out;
}

void Rebalancer::UpdateGauges() {
  if (live_.empty()) return;
  const auto loads = WindowLoads();
  const std::vector<double> now = Imbalances(*dispatcher_.placement(), loads);
  for (size_t i = 0; i < live_.size(); ++i) live_[i]->Set(now[i]);
}

absl::StatusOr<router::Placement> Rebalancer::Plan() const {
  return router::PlanPlacement(*dispatcher_.placement(), WindowLoads(), options_.planner);
}

RebalanceStatusReport Rebalancer::status() const {
  absl::MutexLock lock(&status_mu_);
  return status_;
}

absl::StatusOr<RebalanceOutcome> Rebalancer::Apply(std::optional<router::Placement> target,
                                                   bool keep_old_experts, bool force) {
  if (target.has_value() && !force) {
    const int floor = options_.planner.min_copies;
    if (const int fewest = target->CopiesRange().first; fewest < floor) {
      return absl::FailedPreconditionError(absl::StrCat(
          "the placement leaves a routed expert ", fewest, " cop", fewest == 1 ? "y" : "ies",
          ", below the floor of ", floor,
          " (--min-copies): a server's failure would lose experts; force it to apply anyway"));
    }
  }
  if (!apply_mu_.TryLock()) return absl::AbortedError("another placement change is running");
  absl::StatusOr<RebalanceOutcome> outcome;
  if (!target.has_value()) {
    auto planned = Plan();
    if (planned.ok()) {
      target.emplace(std::move(*planned));
    } else {
      outcome = planned.status();  // returned as is, not recorded
    }
  }
  if (target.has_value()) {
    outcome = ApplyLocked(std::move(*target), keep_old_experts);
    if (outcome.ok() && outcome->switched && !options_.state_file.empty()) {
      // The change stands either way; a placement not kept only means a restart falls back.
      if (absl::Status s =
              WriteFileAtomically(options_.state_file, dispatcher_.placement()->ToJson());
          !s.ok()) {
        options_.logger->Log(
            LogLevel::kWarning,
            absl::StrCat("rebalance: the placement in use is not kept: ", s.message()));
      }
    }
    Record(outcome);
  }
  apply_mu_.Unlock();
  return outcome;
}

void Rebalancer::Record(const absl::StatusOr<RebalanceOutcome>& outcome) {
  absl::MutexLock lock(&status_mu_);
  if (!outcome.ok()) {
    ++status_.failed;
    status_.last_error = std::string(outcome.status().message());
    if (failed_ != nullptr) failed_->Increment();
    options_.logger->Log(LogLevel::kError, absl::StrCat("rebalance: failed: ", status_.last_error));
    return;
  }
  const RebalanceOutcome& o = *outcome;
  ++status_.succeeded;
  status_.last_duration_seconds = o.duration_seconds;
  status_.last_success_unix_seconds =
      std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  if (succeeded_ != nullptr) {
    succeeded_->Increment();
    last_success_->Set(status_.last_success_unix_seconds);
    version_->Set(static_cast<double>(o.version));
    if (o.switched) {
      duration_->Observe(o.duration_seconds);
      switch_time_->Observe(o.switch_seconds);
    }
    for (size_t i = 0; i < before_.size() && i < o.imbalance_before.size(); ++i) {
      before_[i]->Set(o.imbalance_before[i]);
      after_[i]->Set(o.imbalance_after[i]);
    }
  }
  options_.logger->Log(
      LogLevel::kInfo,
      absl::StrFormat("rebalance: placement %u %s in %.3f s (load %.3f s, switch %.4f s; %d "
                      "experts loaded, %d dropped); worst layer imbalance %.3f -> %.3f",
                      o.version, o.switched ? "in use" : "already in use", o.duration_seconds,
                      o.load_seconds, o.switch_seconds, o.experts_loaded, o.experts_dropped,
                      Max(o.imbalance_before), Max(o.imbalance_after)));
}

absl::Status Rebalancer::SetServerPlacement(int s, uint64_t version,
                                            const std::vector<std::pair<int64_t, int64_t>>& experts,
                                            int64_t* loading, int64_t* dropping) {
  internal::v1::SetPlacementRequest req;
  req.set_version(version);
  for (const auto& [l, e] : experts) {
    req.add_layers(static_cast<uint32_t>(l));
    req.add_experts(static_cast<uint32_t>(e));
  }
  DSMOE_ASSIGN_OR_RETURN(const internal::v1::SetPlacementResponse resp,
                         pool_.SetPlacement(s, req, std::chrono::seconds(10)));
  if (loading != nullptr) *loading += resp.num_loading();
  if (dropping != nullptr) *dropping += resp.num_dropping();
  return absl::OkStatus();
}

absl::Status Rebalancer::WaitServing(uint64_t version) {
  const auto deadline = Clock::now() + options_.load_timeout;
  std::vector<bool> ready(pool_.num_servers(), false);
  for (;;) {
    bool all = true;
    for (int s = 0; s < pool_.num_servers(); ++s) {
      if (ready[s]) continue;
      absl::StatusOr<internal::v1::GetExpertsResponse> got =
          pool_.GetExperts(s, std::chrono::seconds(5));
      if (!got.ok()) {
        return absl::UnavailableError(
            absl::StrCat("while placement ", version, " was loading: ", got.status().message()));
      }
      const internal::v1::GetExpertsResponse& resp = *got;
      if (resp.placement_version() != version) {
        return absl::AbortedError(absl::StrCat(pool_.Name(s), " moved to placement ",
                                               resp.placement_version(), " while ", version,
                                               " was loading"));
      }
      if (resp.placement_state() == internal::v1::PLACEMENT_STATE_FAILED) {
        return absl::InternalError(absl::StrCat(pool_.Name(s), " failed to load placement ",
                                                version, ": ", resp.placement_error()));
      }
      ready[s] = resp.placement_state() == internal::v1::PLACEMENT_STATE_SERVING;
      all = all && ready[s];
    }
    if (all) return absl::OkStatus();
    if (stopping_) return absl::CancelledError("the attention server is shutting down");
    if (Clock::now() > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("new replicas did not serve within ",
                       std::chrono::duration<double>(options_.load_timeout).count(), " s"));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

absl::StatusOr<RebalanceOutcome> Rebalancer::ApplyLocked(router::Placement target,
                                                         bool keep_old_experts) {
  const auto start = Clock::now();
  const std::shared_ptr<const router::Placement> current = dispatcher_.placement();
  if (target.num_servers() != current->num_servers() ||
      target.num_layers() != current->num_layers()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the placement is for ", target.num_servers(), " expert servers and ", target.num_layers(),
        " layers; the cluster has ", current->num_servers(), " and ", current->num_layers()));
  }
  for (int64_t l = 0; l < current->num_layers(); ++l) {
    if (target.num_experts(l) != current->num_experts(l))
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, " differs in routed experts"));
  }
  RebalanceOutcome out;
  const bool same = target.SameAs(*current);
  if (same) {
    target.set_version(current->version());
  } else if (target.version() <= current->version()) {
    target.set_version(current->version() + 1);  // versions only grow
  }
  out.version = target.version();
  const auto loads = WindowLoads();
  out.layers = moe_layers_;
  out.imbalance_before = Imbalances(*current, loads);
  out.imbalance_after = Imbalances(target, loads);
  const int S = target.num_servers();
  auto next = std::make_shared<const router::Placement>(std::move(target));

  // 1. Load: every server holds old ∪ new; the old placement serves meanwhile.
  if (!same) {
    for (int s = 0; s < S; ++s) {
      std::set<std::pair<int64_t, int64_t>> both;
      for (const auto& le : current->ExpertsOf(s)) both.insert(le);
      for (const auto& le : next->ExpertsOf(s)) both.insert(le);
      DSMOE_RETURN_IF_ERROR(SetServerPlacement(
          s, out.version, std::vector<std::pair<int64_t, int64_t>>(both.begin(), both.end()),
          &out.experts_loaded, nullptr));
    }
    DSMOE_RETURN_IF_ERROR(WaitServing(out.version));
  }
  const auto loaded = Clock::now();
  out.load_seconds = Seconds(start, loaded);
  // 2. Switch between two steps.
  if (!same) {
    DSMOE_RETURN_IF_ERROR(scheduler_.RunBetweenSteps([&] {
      dispatcher_.SetPlacement(next);
      if (options_.on_switch) options_.on_switch(*next);
    }));
    out.switched = true;
  }
  const auto switched = Clock::now();
  out.switch_seconds = Seconds(loaded, switched);
  // 3. Drop: no step uses the old placement any more (the switch ran on the loop thread,
  // after the last step that did).
  if (!keep_old_experts) {
    for (int s = 0; s < S; ++s) {
      DSMOE_RETURN_IF_ERROR(
          SetServerPlacement(s, out.version, next->ExpertsOf(s), nullptr, &out.experts_dropped));
    }
  }
  out.duration_seconds = Seconds(start, Clock::now());
  return out;
}

void Rebalancer::AutoLoop() {
  const absl::Duration period = absl::Seconds(options_.period_seconds);
  for (;;) {
    {
      absl::MutexLock lock(&auto_mu_);
      const absl::Time deadline = absl::Now() + period;
      while (!stop_) {
        if (auto_cv_.WaitWithDeadline(&auto_mu_, deadline)) break;  // the period is over
      }
      if (stop_) return;
    }
    const auto loads = WindowLoads();
    double total = 0;
    for (const auto& l : loads) {
      for (double x : l) total += x;
    }
    if (total < static_cast<double>(options_.min_window_tokens)) continue;
    const auto current = dispatcher_.placement();
    const double before = Max(Imbalances(*current, loads));
    if (before <= options_.threshold) continue;
    auto plan = router::PlanPlacement(*current, loads, options_.planner);
    if (!plan.ok()) {
      Record(plan.status());
      continue;
    }
    const double after = Max(Imbalances(*plan, loads));
    if (after > before * (1 - options_.min_gain)) continue;  // not worth a change
    options_.logger->Log(
        LogLevel::kInfo,
        absl::StrFormat("rebalance: automatic, worst layer imbalance %.3f > %.3f, plan gives %.3f",
                        before, options_.threshold, after));
    (void)Apply(std::move(*plan), /*keep_old_experts=*/false);
  }
}

}  // namespace dsmoe
