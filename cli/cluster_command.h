// `dsmoe cluster up|down`: a whole dsmoe cluster on 127.0.0.1 — expert servers, attention
// servers and the gateway as separate processes — for demos, tests and benchmarks.
#pragma once

#include <optional>
#include <string>

namespace dsmoe::cli {

struct ClusterUpOptions {
  std::string model;
  int attention_servers = 1;
  int expert_servers = 2;
  int replicas = 1;
  int min_copies = 0;    // the attention servers' --min-copies; 0: theirs (the start-up copies)
  int gateway_port = 0;  // 0: any free port
  int threads = 0;       // compute threads per server; 0: its CPUs (all cores: servers take turns)
  // CPUs per role, "gateway=0;attention=1-3;experts=4-7" (also with ',' between roles); a role
  // not named runs on every CPU. Pinned roles' servers get one compute thread per CPU.
  std::string cpus;
  int num_slots = 32;     // per attention server
  int micro_batches = 0;  // the attention servers' --micro-batches; 0: theirs
  // The attention servers' --kv-cache-memory and --memory-limit ("16Gi", "512M"); "": theirs.
  std::string kv_cache_memory;
  std::string memory_limit;
  bool enable_prefix_caching = true;  // the attention servers' --enable-prefix-caching
  std::string kv_dtype;  // the attention servers' --kv-dtype (auto, f32, bf16); "": theirs
  int dispatch_deadline_ms = 10000;       // attention → expert server call deadline
  int health_check_period_ms = 1000;      // attention → expert and gateway → attention checks
  int health_check_timeout_ms = 2000;     // deadline of one check
  std::string device = "cpu";             // every attention and expert server's --device
  std::string expert_transport = "grpc";  // the attention servers' --expert-transport
  // The attention servers' --device-limited-routing (1 to expert_servers); unset: off.
  std::optional<int> device_limited_routing;
  std::string state_dir;  // pids, ports, logs, placement; default .dsmoe-cluster
  std::string placement;  // placement JSON; default: computed round-robin
  // Security (docs/security.md). By default every endpoint speaks TLS with certificates made
  // for this cluster, the servers require each other's client certificates, and the gateway
  // requires the API key written to <state dir>/tls/api-key.
  bool insecure = false;                     // plain text everywhere (warned about)
  bool no_auth = false;                      // the gateway takes calls without an API key
  bool gateway_require_client_cert = false;  // the gateway also requires client certificates
  // Passed to every attention server when set (> 0): automatic rebalancing and the load window.
  double rebalance_period = 0;
  double rebalance_threshold = 0;
  double load_window_seconds = 0;
  bool json = false;
};

struct ClusterDownOptions {
  std::string state_dir;
};

int RunClusterUp(const ClusterUpOptions& o);
int RunClusterDown(const ClusterDownOptions& o);

}  // namespace dsmoe::cli
