// Active health checking of the servers a service depends on: attention servers check their
// expert servers, the gateway checks its attention servers. A background thread sends one
// grpc.health.v1 Check (overall service "") to every target each period, all at once, each
// with its own deadline, so one frozen target delays nobody's verdict.
//
// A target is kServing after a check answers SERVING (and, on the way up, `verify` accepted
// it), kNotServing while it answers NOT_SERVING (alive, but says it cannot serve everything),
// and kDown after `failure_threshold` checks in a row failed (refused, reset, past the
// deadline) or after a caller reported a failed call with MarkDown. A down target rejoins by
// itself at the first check that passes again: nothing else has to happen.
//
// Thread-safe: health() is one atomic load (the dispatch and request paths read it); MarkDown
// and CheckNow may be called from any thread. Callbacks run on the checker's thread.
#pragma once

#include <prometheus/gauge.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/transport_security.h"
#include "core/util/log.h"
#include "core/util/status.h"

namespace dsmoe::rpc {

struct HealthCheckOptions {
  // Between two rounds of checks: bounds how long a dead target keeps receiving work it would
  // fail, and how soon a healthy one rejoins.
  std::chrono::milliseconds period{1000};
  // Deadline of one Check: a target that takes longer counts as failed (a frozen process).
  std::chrono::milliseconds timeout{2000};
  // Failed checks in a row before a serving target is declared down, so one check delayed on
  // a saturated machine does not take a busy target out (refused connections count the same:
  // a dead process also fails every call sent to it, which MarkDown reports at once).
  int failure_threshold = 2;
  // How log lines name the process and its targets: "<log_prefix>: <target_kind> <i> at <addr>".
  std::string log_prefix = "dsmoe";
  std::string target_kind = "server";
  // Where the health changes are logged (one line each). Not owned; must outlive the checker.
  Logger* logger = DefaultLogger();
  // A target that stays out of service is logged again, with its current reason, this often:
  // an operator who looks at the log later still finds why (not only at the change).
  std::chrono::milliseconds repeat_log_period{30000};
};

enum class TargetHealth : int { kDown = 0, kNotServing = 1, kServing = 2 };
const char* TargetHealthName(TargetHealth h);

class MetricsRegistry;

class HealthChecker {
 public:
  // Called on the checker's thread when target i answers SERVING after not serving (the first
  // time included); an error keeps it out (e.g. it does not hold what it should).
  using Verify = std::function<absl::Status(int target)>;
  // Called on the checker's thread after target i's health changed.
  using OnChange = std::function<void(int target, TargetHealth now)>;

  // Every target starts kDown until its first check; checks reach the targets with `security`
  // (the same transport the calls to them use). `verify` may be empty.
  HealthChecker(std::vector<std::string> addresses, const TransportSecurity& security,
                HealthCheckOptions options, Verify verify = nullptr);
  // The same over channels the caller already has (channels[i] reaches addresses[i]), so a
  // client pool checks its servers on the connections its calls use: a check then fails
  // exactly when those calls would.
  HealthChecker(std::vector<std::string> addresses,
                const std::vector<std::shared_ptr<grpc::Channel>>& channels,
                HealthCheckOptions options, Verify verify = nullptr);
  ~HealthChecker();  // stops the thread
  HealthChecker(const HealthChecker&) = delete;
  HealthChecker& operator=(const HealthChecker&) = delete;

  // Runs the first round of checks before returning (so callers see real states at once), then
  // checks in the background. `on_change` hears every change from the first round on.
  void Start(OnChange on_change);

  int num_targets() const { return static_cast<int>(addresses_.size()); }
  const std::string& address(int target) const { return addresses_[target]; }
  TargetHealth health(int target) const {
    return static_cast<TargetHealth>(health_[target].load(std::memory_order_acquire));
  }
  // Why the target is not serving (empty while it serves).
  std::string Reason(int target) const;

  // A call to `target` failed in transport: it is down now, until a check passes.
  void MarkDown(int target, const std::string& reason);
  // Runs the next round now instead of at the end of the period.
  void CheckNow();
  // Stops the checks (and the callbacks) for good; states stay as they were. Idempotent; the
  // destructor calls it. For owners whose callbacks use objects that die before the checker.
  void Stop();

 private:
  struct Target;
  void Loop();
  void Round();
  // Sets the target's health; returns whether it changed.
  bool SetLocked(int target, TargetHealth h, const std::string& reason)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Log(int target, TargetHealth h, const std::string& reason) const;

  const std::vector<std::string> addresses_;
  // Per target, the TargetHealth as int: written under mu_, read by anyone without it.
  std::unique_ptr<std::atomic<int>[]> health_;
  std::vector<std::unique_ptr<Target>> targets_;
  HealthCheckOptions options_;
  Verify verify_;
  OnChange on_change_;

  mutable absl::Mutex mu_;
  absl::CondVar cv_;
  bool wake_ ABSL_GUARDED_BY(mu_) = false;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::vector<int> changed_ ABSL_GUARDED_BY(mu_);  // targets changed outside the thread
  // Per target: checks failed in a row, and why its health is what it is.
  std::vector<int> failures_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> reasons_ ABSL_GUARDED_BY(mu_);
  // When each target's health was last logged (a target out of service is logged again after
  // repeat_log_period).
  std::vector<std::chrono::steady_clock::time_point> logged_at_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

// The gauges dsmoe_servers_out_of_service{role, reason}: how many of one checker's targets are
// down (unreachable, failing checks, or refused on the way up) and how many report NOT_SERVING.
// Update() after each health change (a checker's OnChange). Thread-compatible.
class OutOfServiceGauges {
 public:
  OutOfServiceGauges(MetricsRegistry& metrics, const std::string& role);
  void Update(const HealthChecker& checker);

 private:
  prometheus::Gauge* down_;
  prometheus::Gauge* not_serving_;
};

}  // namespace dsmoe::rpc
