// What "ready" means to the outside, published in one place: the overall ("") grpc.health.v1
// status (Kubernetes readiness probes and the servers' own health checkers read it) and, the
// first time the server is ready, the ready file that `dsmoe cluster up` waits for. The
// services' own names stay SERVING while the process runs: liveness probes ask for those.
//
// Thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/server.h"
#include "core/util/log.h"

namespace dsmoe::rpc {

class Readiness {
 public:
  // Starts NOT_SERVING; `service` (the server's own gRPC service name) SERVING from now on.
  // REQUIRES: server and logger outlive this. `ready_file` may be empty. Changes are logged
  // as "<log_prefix>: ready" / "<log_prefix>: not ready: <why>".
  Readiness(grpc::Server* server, const std::string& service, std::string ready_file,
            ReadyPorts ports, std::string log_prefix, Logger* logger = DefaultLogger());
  // Publishes the new state; `why_not` (logged on changes) says what is missing.
  void Set(bool ready, const std::string& why_not = "");
  bool ready() const;

 private:
  grpc::Server* server_;
  std::string ready_file_;
  ReadyPorts ports_;  // what the ready file says
  std::string log_prefix_;
  Logger* logger_;
  mutable absl::Mutex mu_;
  bool ready_ ABSL_GUARDED_BY(mu_) = false;
  bool ever_ready_ ABSL_GUARDED_BY(mu_) = false;
  bool ever_set_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace dsmoe::rpc
