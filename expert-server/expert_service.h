// dsmoe-expert-server's service: holds a subset of routed experts (any set of (layer, expert),
// loaded straight from the checkpoint) and computes them for attention servers, combining each
// token's weighted expert outputs before replying.
//
// Thread-safe: gRPC handler threads may call concurrently; computations are serialised (each
// one already uses every core through the thread pool).
#pragma once

#include <memory>
#include <mutex>

#include "core/model/routed_experts.h"
#include "core/model/weights.h"
#include "core/rpc/metrics.h"
#include "core/util/thread_pool.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"

namespace dsmoe {

struct ExpertServiceOptions {
  int threads = 0;                          // compute threads; 0: all cores
  int64_t max_tokens = 4096;                // tokens per request
  int64_t max_assignments = 32768;          // (token, expert) pairs per request
  rpc::MetricsRegistry* metrics = nullptr;  // where this server's metrics go; null: none
};

class ExpertService final : public internal::v1::ExpertService::Service {
 public:
  // REQUIRES: `weights` was loaded with the selection this server serves.
  ExpertService(std::unique_ptr<ModelWeights> weights, const ExpertServiceOptions& options);

  grpc::Status ComputeExperts(grpc::ServerContext* context,
                              const internal::v1::ComputeExpertsRequest* request,
                              internal::v1::ComputeExpertsResponse* response) override;
  grpc::Status GetExperts(grpc::ServerContext* context,
                          const internal::v1::GetExpertsRequest* request,
                          internal::v1::GetExpertsResponse* response) override;
  grpc::Status Echo(grpc::ServerContext* context, const internal::v1::EchoMessage* request,
                    internal::v1::EchoMessage* response) override;

  int64_t num_experts_held() const { return num_held_; }

 private:
  absl::Status Compute(const internal::v1::ComputeExpertsRequest& request, std::string* output,
                       double* compute_seconds);

  std::unique_ptr<ModelWeights> weights_;
  ExpertServiceOptions options_;
  int64_t num_held_ = 0;
  std::mutex mu_;  // serialises computations: the pool and the executor's buffers are shared
  ThreadPool pool_;
  LocalExpertExecutor executor_;
  std::vector<int32_t> token_, expert_;  // guarded by mu_

  // Metrics (null without a registry). Children looked up once; [layer][expert] is null for
  // experts this server does not hold.
  std::vector<std::vector<prometheus::Counter*>> expert_tokens_;
  prometheus::Counter* tokens_ = nullptr;
  prometheus::Histogram* compute_time_ = nullptr;
  rpc::CodeCounters requests_{};
  std::vector<int64_t> counts_;  // [n_routed_experts] scratch; guarded by mu_
};

}  // namespace dsmoe
