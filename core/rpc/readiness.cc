#include "core/rpc/readiness.h"

#include <cstdio>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/server.h"

namespace dsmoe::rpc {

Readiness::Readiness(grpc::Server* server, const std::string& service, std::string ready_file,
                     int port, int metrics_port, std::string log_prefix)
    : server_(server),
      ready_file_(std::move(ready_file)),
      port_(port),
      metrics_port_(metrics_port),
      log_prefix_(std::move(log_prefix)) {
  server_->GetHealthCheckService()->SetServingStatus(service, true);  // liveness: alive
  server_->GetHealthCheckService()->SetServingStatus("", false);      // readiness: not yet
}

void Readiness::Set(bool ready, const std::string& why_not) {
  absl::MutexLock lock(&mu_);
  if (ready == ready_ && ever_set_) return;
  ever_set_ = true;
  ready_ = ready;
  server_->GetHealthCheckService()->SetServingStatus("", ready);
  std::printf("%s: %s%s%s\n", log_prefix_.c_str(), ready ? "ready" : "not ready",
              ready || why_not.empty() ? "" : ": ", ready ? "" : why_not.c_str());
  std::fflush(stdout);
  if (ready && !ever_ready_) {
    ever_ready_ = true;
    if (!ready_file_.empty()) {
      if (absl::Status s = WriteReadyFile(ready_file_, port_, metrics_port_); !s.ok()) {
        std::fprintf(stderr, "%s: %s\n", log_prefix_.c_str(), std::string(s.message()).c_str());
      }
    }
  }
}

bool Readiness::ready() const {
  absl::MutexLock lock(&mu_);
  return ready_;
}

}  // namespace dsmoe::rpc
