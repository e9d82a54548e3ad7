#include "core/rpc/health_checker.h"

#include <grpcpp/grpcpp.h>

#include <cstdio>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "core/rpc/metrics.h"
#include "core/rpc/server.h"
#include "grpc/health/v1/health.grpc.pb.h"

namespace dsmoe::rpc {

using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

const char* TargetHealthName(TargetHealth h) {
  switch (h) {
    case TargetHealth::kServing:
      return "serving";
    case TargetHealth::kNotServing:
      return "not serving";
    case TargetHealth::kDown:
      break;
  }
  return "down";
}

struct HealthChecker::Target {
  std::unique_ptr<grpc::health::v1::Health::Stub> stub;
  // The round in progress (checker thread only).
  std::unique_ptr<grpc::ClientContext> context;
  HealthCheckRequest request;  // service "": the server as a whole
  HealthCheckResponse response;
  grpc::Status status;
};

namespace {

std::vector<std::shared_ptr<grpc::Channel>> MakeChannels(const std::vector<std::string>& addresses,
                                                         const TransportSecurity& security) {
  std::vector<std::shared_ptr<grpc::Channel>> channels;
  for (const std::string& a : addresses) channels.push_back(MakeChannel(a, security));
  return channels;
}

}  // namespace

HealthChecker::HealthChecker(std::vector<std::string> addresses, const TransportSecurity& security,
                             HealthCheckOptions options, Verify verify)
    : HealthChecker(addresses, MakeChannels(addresses, security), std::move(options),
                    std::move(verify)) {}

HealthChecker::HealthChecker(std::vector<std::string> addresses,
                             const std::vector<std::shared_ptr<grpc::Channel>>& channels,
                             HealthCheckOptions options, Verify verify)
    : addresses_(std::move(addresses)),
      health_(new std::atomic<int>[addresses_.size()]),
      options_(std::move(options)),
      verify_(std::move(verify)) {
  for (size_t i = 0; i < addresses_.size(); ++i) {
    health_[i].store(static_cast<int>(TargetHealth::kDown));
    auto t = std::make_unique<Target>();
    t->stub = grpc::health::v1::Health::NewStub(channels[i]);
    targets_.push_back(std::move(t));
  }
  failures_.assign(addresses_.size(), 0);
  reasons_.assign(addresses_.size(), "not checked yet");
  logged_at_.assign(addresses_.size(),
                    std::chrono::steady_clock::now());  // Start logs the first state
}

HealthChecker::~HealthChecker() { Stop(); }

void HealthChecker::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  cv_.SignalAll();
  if (thread_.joinable()) thread_.join();
}

void HealthChecker::Start(OnChange on_change) {
  on_change_ = std::move(on_change);
  {
    absl::MutexLock lock(&mu_);
    for (size_t i = 0; i < targets_.size(); ++i) changed_.push_back(static_cast<int>(i));
  }
  Round();  // reports every target once, so the caller starts from real states
  for (int i = 0; i < num_targets(); ++i) {
    if (health(i) == TargetHealth::kDown) Log(i, TargetHealth::kDown, Reason(i));
  }
  thread_ = std::thread([this] { Loop(); });
}

std::string HealthChecker::Reason(int target) const {
  absl::MutexLock lock(&mu_);
  return reasons_[target];
}

void HealthChecker::MarkDown(int target, const std::string& reason) {
  {
    absl::MutexLock lock(&mu_);
    failures_[target] = options_.failure_threshold;
    if (SetLocked(target, TargetHealth::kDown, reason)) changed_.push_back(target);
    wake_ = true;  // check it again soon: a restarted server rejoins without waiting a period
  }
  cv_.SignalAll();
}

void HealthChecker::CheckNow() {
  {
    absl::MutexLock lock(&mu_);
    wake_ = true;
  }
  cv_.SignalAll();
}

void HealthChecker::Loop() {
  for (;;) {
    {
      absl::MutexLock lock(&mu_);
      const absl::Time deadline = absl::Now() + absl::FromChrono(options_.period);
      while (!stop_ && !wake_) {
        if (cv_.WaitWithDeadline(&mu_, deadline)) break;  // the period is over
      }
      if (stop_) return;
      wake_ = false;
    }
    Round();
  }
}

void HealthChecker::Round() {
  // Every check at once; each completes by its own deadline.
  absl::Mutex done_mu;
  absl::CondVar done_cv;
  size_t outstanding = targets_.size();  // guarded by done_mu
  for (auto& t : targets_) {
    t->context = std::make_unique<grpc::ClientContext>();
    t->context->set_deadline(std::chrono::system_clock::now() + options_.timeout);
    t->response.Clear();
    t->stub->async()->Check(t->context.get(), &t->request, &t->response,
                            [&, target = t.get()](grpc::Status status) {
                              absl::MutexLock lock(&done_mu);
                              target->status = std::move(status);
                              if (--outstanding == 0) done_cv.SignalAll();
                            });
  }
  {
    absl::MutexLock lock(&done_mu);
    while (outstanding != 0) done_cv.Wait(&done_mu);
  }
  for (size_t i = 0; i < targets_.size(); ++i) {
    Target& t = *targets_[i];
    TargetHealth next;
    std::string reason;
    if (!t.status.ok()) {
      absl::MutexLock lock(&mu_);
      ++failures_[i];
      if (failures_[i] < options_.failure_threshold &&
          health(static_cast<int>(i)) != TargetHealth::kDown)
        continue;  // one miss is not yet a verdict
      if (SetLocked(static_cast<int>(i), TargetHealth::kDown,
                    absl::StrCat("health check failed: ", t.status.error_message())))
        changed_.push_back(static_cast<int>(i));
      continue;
    }
    if (t.response.status() == HealthCheckResponse::SERVING) {
      next = TargetHealth::kServing;
      if (health(static_cast<int>(i)) != TargetHealth::kServing && verify_) {
        // On the way up: the target must also be what we expect (outside the lock: it calls it).
        if (absl::Status s = verify_(static_cast<int>(i)); !s.ok()) {
          next = TargetHealth::kDown;
          reason = std::string(s.message());
        }
      }
    } else {
      next = TargetHealth::kNotServing;
      reason = "it reports NOT_SERVING";
    }
    absl::MutexLock lock(&mu_);
    failures_[i] = 0;
    if (SetLocked(static_cast<int>(i), next, reason)) changed_.push_back(static_cast<int>(i));
  }
  std::vector<int> changed;
  {
    absl::MutexLock lock(&mu_);
    changed.swap(changed_);
  }
  if (on_change_) {
    for (int i : changed) on_change_(i, health(i));
  }
}

bool HealthChecker::SetLocked(int target, TargetHealth h, const std::string& reason) {
  reasons_[target] = reason;
  const TargetHealth old = health(target);
  const auto now = std::chrono::steady_clock::now();
  if (old == h) {
    // Still out of service: say so again now and then, with the reason as it is now.
    if (h != TargetHealth::kServing && now - logged_at_[target] >= options_.repeat_log_period) {
      Log(target, h, reason);
      logged_at_[target] = now;
    }
    return false;
  }
  health_[target].store(static_cast<int>(h), std::memory_order_release);
  Log(target, h, reason);
  logged_at_[target] = now;
  return true;
}

void HealthChecker::Log(int target, TargetHealth h, const std::string& reason) const {
  options_.logger->Log(LogLevel::kInfo,
                       absl::StrCat(options_.log_prefix, ": ", options_.target_kind, " ", target,
                                    " at ", addresses_[target], " is ", TargetHealthName(h),
                                    reason.empty() ? "" : ": ", reason));
}

OutOfServiceGauges::OutOfServiceGauges(MetricsRegistry& metrics, const std::string& role) {
  auto& family = metrics.Gauge("dsmoe_servers_out_of_service",
                               "Servers this process depends on that get no work now, by role and "
                               "reason (down: unreachable, failing checks or refused; "
                               "not_serving: they report NOT_SERVING)");
  down_ = &family.Add({{"role", role}, {"reason", "down"}});
  not_serving_ = &family.Add({{"role", role}, {"reason", "not_serving"}});
}

void OutOfServiceGauges::Update(const HealthChecker& checker) {
  int down = 0, not_serving = 0;
  for (int i = 0; i < checker.num_targets(); ++i) {
    down += checker.health(i) == TargetHealth::kDown ? 1 : 0;
    not_serving += checker.health(i) == TargetHealth::kNotServing ? 1 : 0;
  }
  down_->Set(down);
  not_serving_->Set(not_serving);
}

}  // namespace dsmoe::rpc
