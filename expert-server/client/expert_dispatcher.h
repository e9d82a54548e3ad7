// Dispatch and combine across expert servers: a RoutedExpertExecutor that plans each MoE
// layer's dispatch (router::DispatchPlanner) over the servers of an ExpertServerPool that are
// available, sends one ComputeExperts call per expert server concurrently, and adds their
// combined partial sums. Start returns as soon as the calls are in flight, so the caller
// computes the shared experts meanwhile. A server that fails in transport is marked down in the
// pool and the layer is dispatched again over the replicas.
//
// A call goes over the expert server's data plane (expert-server/client/expert_links.h: lean
// frames on a connection held open, driven on the runner's thread) once the server's health
// check has reported its data port, and by gRPC otherwise (no data port, a connection that
// cannot open). Either way a failure in transport marks the server down and fails over.
//
// Each lane (ExpertDispatcherOptions::lanes) has calls and data-plane connections of its own,
// so that several micro-batches' dispatches can be in flight at once.
//
// Thread-compatible (one model runner drives it), like every executor.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/model/routed_experts.h"
#include "core/rpc/metrics.h"
#include "core/util/log.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"
#include "expert-server/client/expert_links.h"
#include "expert-server/client/expert_server_pool.h"
#include "router/dispatch.h"
#include "router/placement.h"

namespace dsmoe {

// Carries calls' hidden states and outputs outside the gRPC messages: the NCCL transport
// (expert-server/client/nccl_links.h). The gRPC call still carries the routing and the status. Used
// from the executor's thread only.
class DispatchSideChannel {
 public:
  virtual ~DispatchSideChannel() = default;
  // The open channel to expert server `server`, as ComputeExpertsRequest.nccl_channel names it;
  // 0: none (the call carries its tensors itself). May start opening one.
  virtual uint64_t ChannelTo(int server) = 0;
  // Starts one call's transfer: rows `rows` of `x` ([*, H], host) go to `server`, and room is
  // made for as many output rows. An error closes the channel (the call then goes by gRPC).
  virtual absl::Status Post(int server, const float* x, const std::vector<int32_t>& rows) = 0;
  // Once that call has finished with `status`: if OK, waits for the outputs and returns them
  // ([rows, H], host, valid until the next Post to `server`); otherwise closes the channel
  // (the expert server closes its side too) and returns the reason.
  virtual absl::StatusOr<const float*> Collect(int server, const absl::Status& status) = 0;
};

struct ExpertDispatcherOptions {
  std::chrono::milliseconds deadline{10000};  // per dispatch call
  rpc::MetricsRegistry* metrics = nullptr;    // where dispatch metrics go; null: none
  // If set, calls to servers it has a channel to move their tensors through it (NCCL). Not
  // owned; must outlive the executor.
  DispatchSideChannel* side_channel = nullptr;
  // Where calls that fall back from the side channel to gRPC are logged. Not owned; must
  // outlive the executor.
  Logger* logger = DefaultLogger();
  // Dispatches in flight at once (the model runner's micro-batches). With a side channel: 1
  // (its transfers are one per server at a time).
  int lanes = 1;
  // Calls go over the expert servers' data plane where they serve one; false: gRPC only.
  bool data_plane = true;
};

// Per expert server (label expert_server = its index in the placement): the instruments of the
// calls to it, looked up once. Updated from gRPC's callback threads (atomic adds; histogram
// observations take prometheus-cpp's per-histogram lock).
struct DispatchMetrics {
  DispatchMetrics(rpc::MetricsRegistry& registry, int server);
  prometheus::Histogram* round_trip;      // send → reply, seconds
  prometheus::Counter* sent_bytes;        // request messages (protobuf size)
  prometheus::Counter* received_bytes;    // reply messages
  prometheus::Counter* assignments;       // routed (token, expert) assignments sent
  prometheus::Counter* tokens;            // hidden-state rows sent
  prometheus::Counter* data_plane_calls;  // calls that went over the data plane (not gRPC)
  rpc::CodeCounters calls;                // finished calls by gRPC code (OK included)
};

class ExpertDispatcher final : public RoutedExpertExecutor {
 public:
  // Expert server s of `placement` (copied) is server s of `pool`. REQUIRES: `pool` outlives
  // this and has placement.num_servers() servers.
  ExpertDispatcher(const ModelConfig& config, const router::Placement& placement,
                   ExpertServerPool& pool, const ExpertDispatcherOptions& options);

  absl::Status Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                   const float* weights, int64_t k, float* out) override;  // on lane 0
  int lanes() const override { return static_cast<int>(lanes_.size()); }
  absl::Status Start(int lane, int64_t layer, const float* x, int64_t T, const int32_t* experts,
                     const float* weights, int64_t k) override;
  absl::Status Finish(int lane, float* out) override;

  // Asks expert server `server` which experts it holds and checks the placement against it
  // (the pool's health-check Verify: a server rejoins only if it holds what it should). A
  // server that answers but holds another set — restarted with its start-up placement after a
  // change, or a change that reached it only in part — is told to load what the placement in
  // use assigns it (SetPlacement, in the background on its side) and stays out until a later
  // check finds it serving that: the attention side is the placement's source of truth.
  // Thread-safe (its own calls).
  absl::Status VerifyServer(int server) const;

  // Dispatches with `placement` from the next layer on. Call from the thread that runs the
  // forward passes, between two of them, so that no step mixes placements. REQUIRES: the same
  // number of servers.
  void SetPlacement(std::shared_ptr<const router::Placement> placement);
  // The placement in use (any thread).
  std::shared_ptr<const router::Placement> placement() const;
  ExpertServerPool& pool() const { return pool_; }

 private:
  struct Call {
    std::unique_ptr<grpc::ClientContext> context;
    internal::v1::ComputeExpertsRequest request;
    internal::v1::ComputeExpertsResponse response;
    grpc::Status status;
    bool active = false;
    std::chrono::steady_clock::time_point sent_at;
    bool over_side_channel = false;      // tensors through options_.side_channel
    const float* side_output = nullptr;  // its outputs once collected
    bool over_data_plane = false;        // the whole call through the lane's links
    const float* link_output = nullptr;  // its outputs once collected
  };
  // One dispatch in flight: the layer in progress (its inputs stay valid until Finish
  // returns), its plan and its calls, one per expert server.
  struct Lane {
    int64_t layer = 0, num_tokens = 0, k = 0;
    const float* x = nullptr;
    const int32_t* experts = nullptr;
    const float* weights = nullptr;
    std::vector<router::ServerWork> work, planned;
    std::vector<Call> calls;             // [server]
    std::unique_ptr<ExpertLinks> links;  // null: gRPC only
    std::vector<bool> link_failing;      // [server]: its last data-plane Start failed (logged once)
    std::chrono::steady_clock::time_point deadline;  // of the calls in flight
    absl::Mutex mu;
    absl::CondVar done_cv;
    int outstanding ABSL_GUARDED_BY(mu) = 0;  // calls whose callback has not run
  };

  // Plans and sends the lane's layer's calls over the servers now considered available.
  absl::Status Send(Lane& lane);
  // Waits for the lane's calls in flight (gRPC and data plane).
  void Wait(Lane& lane);
  // Starts the call to `server` over the lane's data plane; false if it cannot (no data port,
  // no connection): the caller sends it by gRPC.
  bool StartOnDataPlane(Lane& lane, int server, Call& call);
  // Counts a finished call (on gRPC's callback thread, or the runner's for the data plane).
  static void Record(DispatchMetrics& m, std::chrono::steady_clock::time_point sent_at,
                     size_t sent_bytes, size_t received_bytes, grpc::StatusCode code);
  // Fills the call's hidden states: through the side channel when one is open to `server`,
  // else into the request.
  void StageHidden(const Lane& lane, int server, Call& call, const router::ServerWork& work);
  // Settles the side-channel transfers of the calls that finished (before any resend); true if
  // a call must be sent again (its server answered but the channel lost the outputs).
  bool CollectSideChannel(Lane& lane);
  // Marks the servers whose calls failed in transport down (in the pool and the planner);
  // true if there was one, so the layer must be sent again.
  bool MarkTransportFailures(Lane& lane);
  // The lane's finished call to `server` as a status naming the server and the experts it was
  // asked for.
  absl::Status CallResult(const Lane& lane, int server) const;
  // Adds the lane's calls' outputs into `out` ([T, H]); the first failed call's status
  // otherwise.
  absl::Status Combine(const Lane& lane, float* out) const;

  const ModelConfig& config_;
  mutable absl::Mutex placement_mu_;  // for readers on other threads
  std::shared_ptr<const router::Placement> placement_ ABSL_GUARDED_BY(placement_mu_);
  ExpertServerPool& pool_;
  ExpertDispatcherOptions options_;
  router::DispatchPlanner planner_;  // shared by the lanes (one thread drives them all)
  std::vector<std::unique_ptr<DispatchMetrics>> metrics_;  // [server]; empty without metrics
  std::vector<std::unique_ptr<Lane>> lanes_;
};

}  // namespace dsmoe
