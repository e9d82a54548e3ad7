// dsmoe-expert-server's service: holds a subset of routed experts (any set of (layer, expert),
// loaded straight from the checkpoint) and computes them for attention servers, combining each
// token's weighted expert outputs before replying. SetPlacement changes the set while serving:
// a background thread loads the new experts, which then replace the old set between two
// computations.
//
// Thread-safe: gRPC handler threads may call concurrently; computations are serialised (each
// one already uses every core through the thread pool).
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <set>
#include <thread>

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
  std::string model_dir;                    // the checkpoint SetPlacement loads from
};

class ExpertService final : public internal::v1::ExpertService::Service {
 public:
  // REQUIRES: `weights` was loaded with the selection this server serves.
  ExpertService(std::unique_ptr<ModelWeights> weights, const ExpertServiceOptions& options);
  ~ExpertService() override;

  grpc::Status ComputeExperts(grpc::ServerContext* context,
                              const internal::v1::ComputeExpertsRequest* request,
                              internal::v1::ComputeExpertsResponse* response) override;
  grpc::Status GetExperts(grpc::ServerContext* context,
                          const internal::v1::GetExpertsRequest* request,
                          internal::v1::GetExpertsResponse* response) override;
  grpc::Status Echo(grpc::ServerContext* context, const internal::v1::EchoMessage* request,
                    internal::v1::EchoMessage* response) override;
  grpc::Status SetPlacement(grpc::ServerContext* context,
                            const internal::v1::SetPlacementRequest* request,
                            internal::v1::SetPlacementResponse* response) override;

  int64_t num_experts_held() const;

 private:
  absl::Status Compute(const internal::v1::ComputeExpertsRequest& request, std::string* output,
                       double* compute_seconds);

  using ExpertSet = std::set<std::pair<int64_t, int64_t>>;  // (layer, expert)
  absl::Status CheckExperts(const ExpertSet& experts) const;
  // Loads `to_load` (background thread), then swaps the set. Runs on loader_.
  void Load(uint64_t version, ExpertSet to_load, ExpertSet to_drop);
  // Puts target_ in use: swaps `to_load` (from `loaded`) in and `to_drop` out under mu_, then
  // serves it (held set, state, gauges). REQUIRES: state_mu_ held.
  void ServeTargetLocked(const std::shared_ptr<ModelWeights>& loaded, const ExpertSet& to_load,
                         const ExpertSet& to_drop);
  // Makes the loaded experts serve and drops `to_drop`. REQUIRES: mu_ held.
  void SwapLocked(const std::shared_ptr<ModelWeights>& loaded, const ExpertSet& to_load,
                  const ExpertSet& to_drop);
  void CountHeld(int64_t layer, int64_t expert);

  // The composite the executor reads: its routed views point into its own buffer (the experts
  // loaded at start-up) or into a loaded group's (owner_). Views change only under mu_.
  std::unique_ptr<ModelWeights> weights_;
  ExpertServiceOptions options_;
  std::mutex mu_;  // serialises computations and view swaps
  ThreadPool pool_;
  LocalExpertExecutor executor_;
  std::vector<int32_t> token_, expert_;  // guarded by mu_
  // [layer][expert]: the group of loaded weights a view points into (null: weights_ itself, or
  // not held). A group's memory is freed when its last expert is dropped; the start-up
  // buffer is kept whole.
  std::vector<std::vector<std::shared_ptr<ModelWeights>>> owner_;  // guarded by mu_

  // Placement changes.
  mutable std::mutex state_mu_;
  ExpertSet held_;        // guarded by state_mu_
  ExpertSet target_;      // guarded by state_mu_: the latest requested set
  uint64_t version_ = 0;  // guarded by state_mu_
  internal::v1::PlacementState state_ = internal::v1::PLACEMENT_STATE_SERVING;
  std::string error_;   // guarded by state_mu_
  std::thread loader_;  // the load in progress (joined before the next)
  prometheus::Gauge* held_gauge_ = nullptr;
  prometheus::Gauge* version_gauge_ = nullptr;
  prometheus::Family<prometheus::Counter>* tokens_family_ = nullptr;

  // Metrics (null without a registry). Children looked up once; [layer][expert] is null for
  // experts this server does not hold.
  std::vector<std::vector<prometheus::Counter*>> expert_tokens_;
  prometheus::Counter* tokens_ = nullptr;
  prometheus::Histogram* compute_time_ = nullptr;
  rpc::CodeCounters requests_{};
  std::vector<int64_t> counts_;  // [n_routed_experts] scratch; guarded by mu_
};

}  // namespace dsmoe
