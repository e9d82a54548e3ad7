// The attention server's expert servers, as one object: for each, its address, one channel and
// stub (reached with the cluster's transport security), whether it may get work now, and the
// conversion of a failed call into an absl::Status that names the server and the call. Every
// client of the expert servers — dispatch (ExpertDispatcher), the NCCL links, the rebalancer and
// the health checks — goes through one pool, so each server has one connection and one health
// state that all of them agree on.
//
// Health. With health checks (Options::health_checks), a server is available while its checks
// say SERVING (rpc::HealthChecker: one Check per period on the pool's own channels, `verify`
// asked on the way up); MarkDown takes it out until a check passes again. Before
// StartHealthChecks every server counts as down. Without health checks, MarkDown takes a server
// out for retry_down_after, after which it gets work again (and is marked down again if it
// still fails).
//
// Thread-safe: the stubs are gRPC's (thread-safe), the health state atomics or under a lock.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/health_checker.h"
#include "core/rpc/transport_security.h"
#include "core/util/log.h"
#include "core/util/status.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"

namespace dsmoe {

struct ExpertServerPoolOptions {
  using Clock = std::chrono::steady_clock;
  // How the expert servers are reached: mutual TLS with this process's certificate, or plain
  // text when chosen explicitly. The default (TLS, system roots, no identity) suits no cluster.
  rpc::TransportSecurity security;
  // Active health checks of every server; nullopt: none (then only MarkDown takes one out).
  std::optional<rpc::HealthCheckOptions> health_checks;
  // Without health checks: how long a server marked down rests before it gets work again.
  std::chrono::milliseconds retry_down_after{2000};
  // The clock behind retry_down_after; injected by tests, steady_clock otherwise.
  std::function<Clock::time_point()> now = [] { return Clock::now(); };
  // Where the pool's health checker logs (it replaces health_checks->logger). Not owned; must
  // outlive the pool.
  Logger* logger = DefaultLogger();
};

class ExpertServerPool {
 public:
  using Stub = internal::v1::ExpertService::Stub;

  // Expert server s is `addresses[s]` (placement order). Opens no connection yet: gRPC
  // connects on the first call.
  ExpertServerPool(std::vector<std::string> addresses, ExpertServerPoolOptions options);
  ~ExpertServerPool();  // stops the health checks
  ExpertServerPool(const ExpertServerPool&) = delete;
  ExpertServerPool& operator=(const ExpertServerPool&) = delete;

  int num_servers() const { return static_cast<int>(addresses_.size()); }
  const std::string& address(int server) const { return addresses_[server]; }
  const rpc::TransportSecurity& security() const { return options_.security; }
  // The stub of `server`, for calls the pool has no helper for (ComputeExperts, asynchronous;
  // OpenNcclChannel, cancellable). Valid for the pool's lifetime.
  Stub& stub(int server) const { return *stubs_[server]; }

  // "expert server <s> at <address>": how every message about it begins.
  std::string Name(int server) const;
  // A finished call to `server` as an absl::Status: OK stays OK; otherwise the same code and
  // "expert server <s> at <address>: <what>: <the server's message>".
  absl::Status CallStatus(int server, absl::string_view what, const grpc::Status& status) const;

  // Unary calls with a deadline `timeout` from now; failures as CallStatus names them.
  absl::StatusOr<internal::v1::GetExpertsResponse> GetExperts(
      int server, std::chrono::milliseconds timeout) const;
  absl::StatusOr<internal::v1::SetPlacementResponse> SetPlacement(
      int server, const internal::v1::SetPlacementRequest& request,
      std::chrono::milliseconds timeout) const;

  // Whether `server` may get work now (see the file comment).
  bool available(int server) const;
  // A call to `server` failed in transport: out until a check passes (with health checks) or
  // for retry_down_after (without). `reason` is logged and kept as the server's health reason.
  void MarkDown(int server, const std::string& reason);

  // Starts the health checks. The first round runs before this returns; `verify` (may be empty)
  // is asked each time a server answers SERVING after not serving, and an error keeps it out;
  // `on_change` hears every change of a server's health. Both run on the checker's thread.
  // Called once; without options.health_checks it does nothing.
  void StartHealthChecks(rpc::HealthChecker::Verify verify, rpc::HealthChecker::OnChange on_change);
  // Stops the health checks and their callbacks (states freeze). Idempotent; for owners whose
  // callbacks use objects that die before the pool.
  void StopHealthChecks();
  // The health checker (null without health checks): its per-server states and reasons.
  const rpc::HealthChecker* health_checker() const { return health_.get(); }

 private:
  const std::vector<std::string> addresses_;
  const ExpertServerPoolOptions options_;
  std::vector<std::shared_ptr<grpc::Channel>> channels_;
  std::vector<std::unique_ptr<Stub>> stubs_;
  // Set once by StartHealthChecks, before the checker's first round reads it.
  rpc::HealthChecker::Verify verify_;
  std::unique_ptr<rpc::HealthChecker> health_;  // declared last: stopped first

  // Without health checks: since when each server has been down (nullopt: it is not).
  mutable absl::Mutex down_mu_;
  mutable std::vector<std::optional<ExpertServerPoolOptions::Clock::time_point>> down_since_
      ABSL_GUARDED_BY(down_mu_);
};

}  // namespace dsmoe
