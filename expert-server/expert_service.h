// dsmoe-expert-server's service: holds a subset of routed experts (any set of (layer, expert),
// loaded straight from the checkpoint, on the CPU or a GPU: see ExpertStore) and computes them
// for attention servers, combining each token's weighted expert outputs before replying.
// SetPlacement changes the set while serving: a background thread loads (and uploads) the new
// set, which then replaces the old one between two computations.
//
// Thread-safe: gRPC handler threads may call concurrently; computations are serialised (each
// one already uses every core through the thread pool, or the whole GPU).
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <set>
#include <span>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/metrics.h"
#include "core/util/log.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"
#include "expert-server/expert_store.h"

namespace dsmoe {

struct ExpertServiceOptions {
  rpc::MetricsRegistry* metrics = nullptr;  // where this server's metrics go; null: none
  // Where placement changes and NCCL channels are logged. Not owned; must outlive the service.
  Logger* logger = DefaultLogger();
};

// One ComputeExperts call, whatever carried it (a gRPC message, a data-plane frame): views into
// the transport's buffers, valid for the call.
struct ComputeCall {
  uint32_t layer = 0;
  int64_t num_tokens = 0;
  // [num_tokens, hidden_size] f32; null with nccl_channel. hidden_bytes: what the transport
  // carried (checked against num_tokens).
  const float* hidden = nullptr;
  size_t hidden_bytes = 0;
  std::span<const uint32_t> token;   // per assignment: row of hidden
  std::span<const uint32_t> expert;  // per assignment: routed expert of the layer
  std::span<const float> weight;     // per assignment: routing weight
  uint64_t nccl_channel = 0;         // non-zero: the tensors go through that NCCL channel
};

class ExpertService final : public internal::v1::ExpertService::Service {
 public:
  // Serves what `store` holds, within its limits per request (max_tokens, max_assignments).
  ExpertService(std::unique_ptr<ExpertStore> store, const ExpertServiceOptions& options);
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
  grpc::Status OpenNcclChannel(grpc::ServerContext* context,
                               const internal::v1::OpenNcclChannelRequest* request,
                               internal::v1::OpenNcclChannelResponse* response) override;

  int64_t num_experts_held() const;

  // Where the output of a valid call goes: room for num_tokens rows of hidden_size floats,
  // asked for once the call has been validated (so that an invalid one costs nothing).
  using OutputFn = absl::FunctionRef<float*(int64_t num_tokens)>;
  // Validates and computes one call, as ComputeExperts does for every transport: the same
  // checks and messages, the same metrics (requests by code, compute time, tokens, per expert),
  // serialised with the other computations. Thread-safe.
  absl::Status Compute(const ComputeCall& call, OutputFn output, double* compute_seconds,
                       ExpertStore::Deadline deadline);

  // What a call may carry at most, and the model's hidden size.
  int64_t max_tokens() const { return store_->options().max_tokens; }
  int64_t max_assignments() const { return store_->max_assignments(); }
  int64_t hidden_size() const { return store_->config().hidden_size; }
  // The data plane's port, as GetExperts reports it (0: none). Set before serving.
  void set_data_port(int port) { data_port_.store(static_cast<uint32_t>(port)); }

 private:
  absl::Status Validate(const ComputeCall& call) const;
  absl::Status Run(const ComputeCall& call, OutputFn output, double* compute_seconds,
                   ExpertStore::Deadline deadline);

  absl::Status CheckExperts(const ExpertSet& experts) const;
  // Prepares `change` (background thread), then serves it. Runs on loader_.
  void Load(uint64_t version, PlacementChange change);
  // Puts target_ in use: commits the prepared change between two computations, then serves it
  // (held set, state, gauges).
  void ServeTargetLocked(ExpertStore::Commit commit, const ExpertSet& to_load)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_mu_);
  void CountHeld(int64_t layer, int64_t expert) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  std::unique_ptr<ExpertStore> store_;  // computed and changed only under mu_
  ExpertServiceOptions options_;
  absl::Mutex mu_;  // serialises computations and commits
  std::vector<int32_t> token_ ABSL_GUARDED_BY(mu_), expert_ ABSL_GUARDED_BY(mu_);

  // Placement changes.
  mutable absl::Mutex state_mu_;
  ExpertSet held_ ABSL_GUARDED_BY(state_mu_);
  ExpertSet target_ ABSL_GUARDED_BY(state_mu_);  // the latest requested set
  uint64_t version_ ABSL_GUARDED_BY(state_mu_) = 0;
  internal::v1::PlacementState state_ = internal::v1::PLACEMENT_STATE_SERVING;
  std::string error_ ABSL_GUARDED_BY(state_mu_);
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
  std::atomic<uint32_t> data_port_{0};
  std::vector<int64_t> counts_ ABSL_GUARDED_BY(mu_);  // [n_routed_experts] scratch
};

}  // namespace dsmoe
