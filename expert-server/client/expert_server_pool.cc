#include "expert-server/client/expert_server_pool.h"

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/grpc_status.h"
#include "core/rpc/server.h"

namespace dsmoe {

ExpertServerPool::ExpertServerPool(std::vector<std::string> addresses,
                                   ExpertServerPoolOptions options)
    : addresses_(std::move(addresses)),
      options_(std::move(options)),
      down_since_(addresses_.size()) {
  for (const std::string& a : addresses_) {
    channels_.push_back(rpc::MakeChannel(a, options_.security));
    stubs_.push_back(internal::v1::ExpertService::NewStub(channels_.back()));
  }
  if (options_.health_checks.has_value()) {
    rpc::HealthCheckOptions checks = *options_.health_checks;
    checks.logger = options_.logger;
    // The checker asks verify_ through this forwarder, so it can exist (and report every
    // server down) before the caller has what verifies a server.
    health_ = std::make_unique<rpc::HealthChecker>(
        addresses_, channels_, std::move(checks),
        [this](int server) { return verify_ ? verify_(server) : absl::OkStatus(); });
  }
}

ExpertServerPool::~ExpertServerPool() = default;

std::string ExpertServerPool::Name(int server) const {
  return absl::StrCat("expert server ", server, " at ", addresses_[server]);
}

absl::Status ExpertServerPool::CallStatus(int server, absl::string_view what,
                                          const grpc::Status& status) const {
  if (status.ok()) return absl::OkStatus();
  return rpc::FromGrpc(status, absl::StrCat(Name(server), ": ", what));
}

absl::StatusOr<internal::v1::GetExpertsResponse> ExpertServerPool::GetExperts(
    int server, std::chrono::milliseconds timeout) const {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  internal::v1::GetExpertsResponse response;
  DSMOE_RETURN_IF_ERROR(CallStatus(
      server, "GetExperts",
      stubs_[server]->GetExperts(&context, internal::v1::GetExpertsRequest(), &response)));
  return response;
}

absl::StatusOr<internal::v1::SetPlacementResponse> ExpertServerPool::SetPlacement(
    int server, const internal::v1::SetPlacementRequest& request,
    std::chrono::milliseconds timeout) const {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + timeout);
  internal::v1::SetPlacementResponse response;
  DSMOE_RETURN_IF_ERROR(CallStatus(server,
                                   absl::StrCat("SetPlacement (placement ", request.version(), ")"),
                                   stubs_[server]->SetPlacement(&context, request, &response)));
  return response;
}

bool ExpertServerPool::available(int server) const {
  if (health_ != nullptr) return health_->health(server) == rpc::TargetHealth::kServing;
  absl::MutexLock lock(&down_mu_);
  std::optional<ExpertServerPoolOptions::Clock::time_point>& since = down_since_[server];
  if (since.has_value() && options_.now() - *since >= options_.retry_down_after) {
    since.reset();  // rested long enough: it gets another try
  }
  return !since.has_value();
}

void ExpertServerPool::MarkDown(int server, const std::string& reason) {
  if (health_ != nullptr) {
    health_->MarkDown(server, reason);
    return;
  }
  absl::MutexLock lock(&down_mu_);
  down_since_[server] = options_.now();
}

void ExpertServerPool::StartHealthChecks(rpc::HealthChecker::Verify verify,
                                         rpc::HealthChecker::OnChange on_change) {
  if (health_ == nullptr) return;
  verify_ = std::move(verify);
  health_->Start(std::move(on_change));
}

void ExpertServerPool::StopHealthChecks() {
  if (health_ != nullptr) health_->Stop();
}

}  // namespace dsmoe
