// dsmoe-attention-server as an object: the model without its routed experts (or with them, when
// there are no expert servers), a continuous-batching Scheduler, the AttentionService and
// PlacementService on a gRPC port, and, with expert servers, the client pool of them (health
// checks, dispatch, the optional NCCL links) and the Rebalancer. The main is flags -> Options ->
// Create -> wait for a signal -> Shutdown; tests create it beside a gateway and expert servers
// in one process.
//
// Ready ("" SERVING, and the ready file) means every routed expert has a serving holder: at
// once without expert servers, else as soon as the health checks find one for each.
//
// Nothing global: no signal handling, no process-wide state beyond gRPC's own, every port
// (ephemeral by default) readable from the object.
//
// Thread-safe: the accessors are const after Create; Wait and Shutdown may be called from any
// thread, Shutdown any number of times.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "attention-server/attention_metrics.h"
#include "attention-server/attention_service.h"
#include "attention-server/placement_service.h"
#include "attention-server/rebalancer.h"
#include "attention-server/scheduler.h"
#include "core/rpc/health_checker.h"
#include "core/rpc/metrics.h"
#include "core/rpc/readiness.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_options.h"
#include "core/rpc/transport_security.h"
#include "core/util/device.h"
#include "core/util/log.h"
#include "expert-server/client/expert_dispatcher.h"
#include "expert-server/client/expert_server_pool.h"
#include "router/placement.h"

namespace dsmoe {

struct AttentionServerOptions {
  // The checkpoint directory (required). With expert servers only the attention side is loaded.
  std::string model_dir;
  // Expert server addresses in placement order; empty: routed experts run in this process.
  std::vector<std::string> expert_servers;
  // Placement JSON shared with the expert servers; "": round-robin over the expert servers with
  // num_replicas copies of each expert (every process computes the same).
  std::string placement_file;
  int num_replicas = 1;
  // The placement in use, kept across restarts: read at start when it exists (instead of
  // placement_file; expert servers that hold another set are re-synced to it), and written after
  // each change. "": not kept (a restart starts from placement_file).
  std::string placement_state_file;
  // Deadline of each ComputeExperts call: a slower server is taken out (replicas take over).
  std::chrono::milliseconds dispatch_deadline{10000};
  // Device-limited routing (core/model/gate.h, docs/fanout.md): each token's routed experts come
  // from at most this many expert servers of the placement in use (rebuilt when it changes).
  // Unset: off — a model not trained with it routes differently. Needs expert servers and the
  // CPU runner; 1 to the number of expert servers.
  std::optional<int> device_limited_routing;
  // How hidden states reach the expert servers: in the gRPC messages, or GPU to GPU over NCCL
  // (with a cuda device and expert servers on GPUs; gRPC wherever a channel cannot open).
  enum class ExpertTransport { kGrpc, kNccl };
  ExpertTransport expert_transport = ExpertTransport::kGrpc;
  // Micro-batches per forward pass with expert servers: each step's batch is split in this
  // many parts that interleave layer by layer, one's routed experts computing on the expert
  // servers while the next runs its attention and shared experts. 1 (the default): one batch.
  // More pays only where the expert side has time to spare: on CPUs every micro-batch re-reads
  // the experts' weights, and measured m = 2 was 0.8-1.0x of m = 1 (docs/disaggregation.md).
  int micro_batches = 1;
  // Health checks of the expert servers (log lines name this process "dsmoe-attention-server").
  rpc::HealthCheckOptions expert_health;
  // Slots, tokens per forward pass, context, the KV cache's budget and pages, queue limits.
  SchedulerOptions scheduler;
  // The memory plan (weights, KV cache, activations; core/model/memory_plan.h) must fit this
  // many bytes, or Create fails naming the numbers. 0: the cgroup's limit, if any.
  int64_t memory_limit = 0;
  Device device;    // where the forward pass runs: cpu or cuda:N
  int threads = 0;  // CPU compute threads; 0: all cores
  // Routing load is measured over this recent window (imbalance gauges, planner).
  double load_window_seconds = 60;
  // Automatic rebalancing and the planner's budget; planner.num_replicas < 0: one replica per
  // expert server; planner.min_copies 0: the fewest copies of an expert in the start-up
  // placement (the redundancy the cluster was started with is kept by every later plan).
  RebalancerOptions rebalance = [] {
    RebalancerOptions o;
    o.planner.num_replicas = -1;
    o.planner.min_copies = 0;
    return o;
  }();
  // Where it serves (ephemeral ports on 127.0.0.1 by default), the metrics endpoint and name.
  rpc::ServingOptions serving;
  // Transport security of its port and of its calls to the expert servers, loaded and checked
  // in Create. Mutual TLS by default: only the gateway, with a certificate of the cluster.
  rpc::TransportSecurityOptions tls;
  // If set, a plain-text port serving only grpc.health.v1 Check (Kubernetes probes).
  std::string health_listen;
  // Where the server and everything it owns log (readiness, the expert servers' health, dispatch
  // and NCCL fallbacks, rebalancing, start-up warnings); it replaces expert_health.logger and
  // rebalance.logger. Not owned; must outlive the server. Default: stdout/stderr as always.
  Logger* logger = DefaultLogger();
};

class AttentionServer {
 public:
  // Validates `options` (INVALID_ARGUMENT naming the field), loads the security material, the
  // weights and the placement, and starts serving and checking the expert servers.
  static absl::StatusOr<std::unique_ptr<AttentionServer>> Create(AttentionServerOptions options);
  ~AttentionServer();  // Shutdown(), then everything stops in dependency order
  AttentionServer(const AttentionServer&) = delete;
  AttentionServer& operator=(const AttentionServer&) = delete;

  int port() const { return running_.port; }
  std::string address() const { return running_.address(); }  // 127.0.0.1:<port>
  int metrics_port() const { return metrics_port_; }          // 0: none
  // Everything this server exports (what its metrics endpoint serves).
  const rpc::MetricsRegistry& metrics() const { return *metrics_; }
  int health_port() const { return running_.health_port; }  // 0: none
  bool ready() const { return readiness_->ready(); }
  // "on <address> (<device>; <security>; <n> expert servers, <n> slots), metrics on port <p>".
  std::string Describe() const;

  // Blocks until Shutdown has finished (on any thread).
  void Wait();
  // Stops the expert servers' health checks, then serving: calls in flight get up to 5 s to
  // finish, then are cancelled; the metrics endpoint closes. Idempotent; safe from any thread,
  // concurrently with Wait.
  void Shutdown();

 private:
  explicit AttentionServer(AttentionServerOptions options) : options_(std::move(options)) {}
  absl::Status Start();
  // Logs and exports the memory plan; RESOURCE_EXHAUSTED when it exceeds the limit.
  absl::Status CheckMemory();
  // The placement, the pool (with its health checks, not yet started), the NCCL links if asked
  // and the dispatcher. REQUIRES: expert servers were given.
  absl::Status ConnectExpertServers(const ModelConfig& config);
  absl::Status StartServing();
  // Device-limited routing over `placement`'s servers, on the runner. REQUIRES: the loop
  // thread between steps, or before the scheduler runs.
  absl::Status SetDeviceLimit(const router::Placement& placement);
  // Routed experts no available expert server holds: how many, and a message naming the first.
  std::pair<int64_t, std::string> MissingExperts() const;
  // After an expert server's health changed: readiness and the out-of-service gauges.
  void OnExpertServerHealth();

  const AttentionServerOptions options_;
  // options_.scheduler with its KV dtype made concrete for the loaded weights (Start): what
  // the plan, the runner and Describe use.
  SchedulerOptions scheduler_options_;
  rpc::TransportSecurity security_;
  int metrics_port_ = 0;
  // Declared in dependency order: each member is used only by those declared after it, so
  // destruction (reverse order) never leaves a user behind. Shutdown stops the health checks
  // first, whose callbacks reach readiness_ and dispatcher_.
  std::unique_ptr<ModelWeights> weights_;
  std::unique_ptr<rpc::MetricsRegistry> metrics_;
  std::unique_ptr<AttentionMetrics> attention_metrics_;
  std::unique_ptr<ExpertServerPool> expert_pool_;    // null: local experts
  std::unique_ptr<DispatchSideChannel> nccl_links_;  // null: gRPC only
  std::unique_ptr<ExpertDispatcher> dispatcher_;     // null: local experts
  std::unique_ptr<ThreadPool> thread_pool_;
  std::unique_ptr<Scheduler> scheduler_;
  ModelRunner* model_runner_ = nullptr;  // the scheduler's, with device-limited routing; else null
  std::unique_ptr<Rebalancer> rebalancer_;  // null: local experts
  std::unique_ptr<PlacementService> placement_service_;
  std::unique_ptr<AttentionService> attention_service_;
  rpc::RunningServer running_;
  std::unique_ptr<rpc::Readiness> readiness_;
  // With expert servers: dsmoe_servers_out_of_service{role="expert_server"} and
  // dsmoe_routed_experts_without_live_copy.
  std::unique_ptr<rpc::OutOfServiceGauges> expert_servers_out_;
  prometheus::Gauge* experts_without_live_copy_ = nullptr;

  rpc::ShutdownOnce shutdown_;
};

}  // namespace dsmoe
