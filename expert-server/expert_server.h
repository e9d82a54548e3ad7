// dsmoe-expert-server as an object: the routed experts its placement entry names, loaded from
// the checkpoint into an ExpertStore, served by an ExpertService on a gRPC port (with its
// transport security, health, reflection and Prometheus metrics). The main is flags -> Options
// -> Create -> wait for a signal -> Shutdown; tests create several in one process.
//
// Nothing global: no signal handling, no process-wide state beyond gRPC's own, every port
// (ephemeral by default) readable from the object.
//
// Thread-safe: the accessors are const after Create; Wait and Shutdown may be called from any
// thread, Shutdown any number of times.
#pragma once

#include <memory>
#include <string>

#include "core/rpc/metrics.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_options.h"
#include "core/rpc/transport_security.h"
#include "core/util/log.h"
#include "core/util/status.h"
#include "expert-server/data_plane_server.h"
#include "expert-server/expert_service.h"
#include "expert-server/expert_store.h"

namespace dsmoe {

struct ExpertServerOptions {
  // The checkpoint directory (required): the config, and the routed experts loaded from it.
  std::string model_dir;
  // Placement JSON shared with the attention servers; "": computed round-robin over
  // num_servers with num_replicas copies of each expert (every process computes the same).
  std::string placement_file;
  int num_servers = 1;   // computed placement only
  int num_replicas = 1;  // computed placement only
  // This server's index in the placement: which experts it holds.
  int server_index = 0;
  // Where the experts live and how they are computed: device (cpu or cuda:N), CPU threads
  // (0: all cores), tokens per request at most. store.model_dir is set from model_dir.
  ExpertStoreOptions store;
  // Where it serves (ephemeral ports on 127.0.0.1 by default), the metrics endpoint and name.
  rpc::ServingOptions serving;
  // Transport security, loaded and checked in Create. Mutual TLS by default: only attention
  // servers (and the gateway) with a certificate of the cluster may call.
  rpc::TransportSecurityOptions tls;
  // If set, a plain-text port serving only grpc.health.v1 Check (Kubernetes probes).
  std::string health_listen;
  // Where the data plane (ComputeExperts framed over TCP/TLS, with `tls` as its security;
  // data_plane_server.h) listens: ephemeral on 127.0.0.1 by default, like the gRPC port. "":
  // none (GetExperts reports data_port 0 and attention servers keep to gRPC).
  std::string data_listen = "127.0.0.1:0";
  // Where the server and everything it owns log (the service's placement changes, start-up
  // warnings). Not owned; must outlive the server. Default: stdout/stderr as always.
  Logger* logger = DefaultLogger();
};

class ExpertServer {
 public:
  // Validates `options` (INVALID_ARGUMENT naming the field), loads the security material, the
  // placement and the experts, and starts serving; the ready file is written at once (an expert
  // server is ready as soon as it serves).
  static absl::StatusOr<std::unique_ptr<ExpertServer>> Create(ExpertServerOptions options);
  ~ExpertServer();  // Shutdown()
  ExpertServer(const ExpertServer&) = delete;
  ExpertServer& operator=(const ExpertServer&) = delete;

  int port() const { return running_.port; }
  std::string address() const { return running_.address(); }  // 127.0.0.1:<port>
  int metrics_port() const { return metrics_port_; }          // 0: none
  int health_port() const { return running_.health_port; }    // 0: none
  int data_port() const { return data_plane_ ? data_plane_->port() : 0; }  // 0: none
  int server_index() const { return options_.server_index; }
  int64_t num_experts_held() const { return service_->num_experts_held(); }
  // "serving <n> routed experts on <address> (<device>, <security>), data plane on port <d>,
  // metrics on port <p>".
  std::string Describe() const;

  // Blocks until Shutdown has finished (on any thread).
  void Wait();
  // Stops serving: the data plane closes its connections once a computation in progress has
  // finished; gRPC calls in flight get up to 5 s to finish, then are cancelled; the metrics
  // endpoint closes. Idempotent; safe from any thread, concurrently with Wait.
  void Shutdown();

 private:
  explicit ExpertServer(ExpertServerOptions options) : options_(std::move(options)) {}
  absl::Status Start();

  const ExpertServerOptions options_;
  rpc::TransportSecurity security_;
  int metrics_port_ = 0;
  // Declared in dependency order: destroyed server first, metrics last.
  std::unique_ptr<rpc::MetricsRegistry> metrics_;
  std::unique_ptr<ExpertService> service_;
  std::unique_ptr<DataPlaneServer> data_plane_;
  rpc::RunningServer running_;

  rpc::ShutdownOnce shutdown_;
};

}  // namespace dsmoe
