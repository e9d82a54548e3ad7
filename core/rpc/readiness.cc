#include "core/rpc/readiness.h"

#include <cstdio>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/server.h"

namespace dsmoe::rpc {

Readiness::Readiness(grpc::Server* server, const std::string& service, std::string ready_file,
                     ReadyPorts ports, std::string log_prefix, Logger* logger)
    : server_(server),
      ready_file_(std::move(ready_file)),
      ports_(ports),
      log_prefix_(std::move(log_prefix)),
      logger_(logger) {
  server_->GetHealthCheckService()->SetServingStatus(service, true);  // liveness: alive
  server_->GetHealthCheckService()->SetServingStatus("", false);      // readiness: not yet
}

void Readiness::Set(bool ready, const std::string& why_not) {
  absl::MutexLock lock(&mu_);
  if (ready == ready_ && ever_set_) return;
  ever_set_ = true;
  ready_ = ready;
  server_->GetHealthCheckService()->SetServingStatus("", ready);
  logger_->Log(LogLevel::kInfo,
               absl::StrCat(log_prefix_, ": ", ready ? "ready" : "not ready",
                            ready || why_not.empty() ? "" : ": ", ready ? "" : why_not));
  if (ready && !ever_ready_) {
    ever_ready_ = true;
    if (!ready_file_.empty()) {
      if (absl::Status s = WriteReadyFile(ready_file_, ports_); !s.ok()) {
        logger_->Log(LogLevel::kError, absl::StrCat(log_prefix_, ": ", s.message()));
      }
    }
  }
}

bool Readiness::ready() const {
  absl::MutexLock lock(&mu_);
  return ready_;
}

}  // namespace dsmoe::rpc
