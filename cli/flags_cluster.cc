// Flags of `dsmoe cluster up|down` and `dsmoe placement show|plan|apply`.
#include <memory>

#include "cli/cluster_command.h"
#include "cli/flags.h"
#include "cli/placement_command.h"

namespace dsmoe::cli {
namespace {

// The shape of the cluster: which processes, how many, what they compute on.
void AddClusterShapeFlags(CLI::App* up_cmd, ClusterUpOptions& up) {
  up_cmd->add_option("--model", up.model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  up_cmd->add_option("--attention-servers", up.attention_servers, "Attention servers")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  up_cmd->add_option("--expert-servers", up.expert_servers, "Expert servers")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  up_cmd->add_option("--replicas", up.replicas, "Copies of each routed expert")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  up_cmd
      ->add_option("--min-copies", up.min_copies,
                   "Copies every routed expert keeps through placement changes (default: "
                   "--replicas)")
      ->check(CLI::Range(1, 256));
  up_cmd
      ->add_option("--micro-batches", up.micro_batches,
                   "Micro-batches per step on the attention servers: one's expert dispatch "
                   "overlaps the next's attention (default: theirs)")
      ->check(CLI::Range(1, 16));
  up_cmd->add_option("--placement", up.placement, "Placement JSON (default: round-robin)")
      ->check(CLI::ExistingFile);
  up_cmd->add_option("--gateway-port", up.gateway_port, "Gateway port (default: any free one)")
      ->check(CLI::Range(0, 65535));
  up_cmd
      ->add_option("--threads", up.threads,
                   "Compute threads per server (default: one per CPU it may use: all cores, the "
                   "servers taking turns, or its --cpus set)")
      ->check(CLI::Range(1, 1024));
  up_cmd->add_option(
      "--cpus", up.cpus,
      "Pin each role's processes to CPUs, as if on machines of their own: ROLE=CPULIST items "
      "separated by ';' (or ','), ROLE one of gateway, attention, experts, CPULIST as taskset -c "
      "takes it (0-3,6). E.g. 'attention=0;experts=1' or 'attention=0-3,8;experts=4-7'. "
      "Every process of a role shares its set; a role not named runs on every CPU");
  up_cmd->add_option("--num-slots", up.num_slots, "Sequences per attention server")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  up_cmd->add_option("--kv-cache-memory", up.kv_cache_memory,
                     "Bytes each attention server's KV cache may take, e.g. 16Gi (default: a "
                     "full context per slot)");
  up_cmd
      ->add_option("--kv-dtype", up.kv_dtype,
                   "Each attention server's KV cache element type: auto (f32 for an F32 "
                   "checkpoint, bf16 otherwise), f32 or bf16 (default: theirs, auto)")
      ->check(KvDTypeValidator());
  up_cmd->add_option("--memory-limit", up.memory_limit,
                     "Attention servers refuse to start when their memory plan exceeds this, "
                     "e.g. 32Gi (default: their cgroup's limit)");
  up_cmd->add_flag("--enable-prefix-caching,!--no-enable-prefix-caching", up.enable_prefix_caching,
                   "Attention servers reuse the KV pages of cached prompt prefixes (default on)");
  up_cmd
      ->add_option("--device", up.device,
                   "Where every attention and expert server computes: cpu, cuda or cuda:N")
      ->capture_default_str();
  up_cmd
      ->add_option("--expert-transport", up.expert_transport,
                   "Attention → expert server tensors: grpc, or nccl (GPU to GPU; gRPC where a "
                   "channel cannot open)")
      ->check(CLI::IsMember({"grpc", "nccl"}))
      ->capture_default_str();
  up_cmd->add_option("--device-limited-routing", up.device_limited_routing,
                     "Each token's routed experts only from the M expert servers whose best "
                     "expert scores highest (DeepSeek-V2; 1 to --expert-servers; off by default: "
                     "a model not trained with it routes differently)");
}

// Deadlines, health checks and automatic rebalancing, passed on to the servers.
void AddClusterTimingFlags(CLI::App* up_cmd, ClusterUpOptions& up) {
  up_cmd
      ->add_option("--dispatch-deadline-ms", up.dispatch_deadline_ms,
                   "Deadline of each attention → expert server call")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  up_cmd
      ->add_option("--rebalance-period", up.rebalance_period,
                   "Attention servers rebalance the expert placement on their own, looking "
                   "this often (seconds; needs one attention server)")
      ->check(CLI::Range(0.001, 86400.0));
  up_cmd
      ->add_option("--rebalance-threshold", up.rebalance_threshold,
                   "... when a layer's per-server load imbalance exceeds this (default 1.15)")
      ->check(CLI::Range(1.0, 1000.0));
  up_cmd
      ->add_option("--load-window-seconds", up.load_window_seconds,
                   "Window of the routing load the planner and imbalance gauges use (default 60)")
      ->check(CLI::Range(1.0, 86400.0));
  up_cmd
      ->add_option("--health-check-period-ms", up.health_check_period_ms,
                   "Interval of the health checks (attention → expert servers, gateway → "
                   "attention servers)")
      ->check(CLI::Range(10, 3600000))
      ->capture_default_str();
  up_cmd
      ->add_option("--health-check-timeout-ms", up.health_check_timeout_ms,
                   "Deadline of one health check")
      ->check(CLI::Range(10, 3600000))
      ->capture_default_str();
}

void AddClusterUpDown(CLI::App& app, int* rc) {
  auto* cluster = app.add_subcommand(
      "cluster", "Run a local dsmoe cluster (gateway, attention and expert servers)");
  cluster->require_subcommand(1);

  auto up = std::make_shared<ClusterUpOptions>();
  auto* up_cmd =
      cluster->add_subcommand("up", "Start the processes on 127.0.0.1 and wait until all serve");
  AddClusterShapeFlags(up_cmd, *up);
  AddClusterTimingFlags(up_cmd, *up);
  up_cmd->add_option("--state-dir", up->state_dir,
                     "Where pids, ports and logs go (default: .dsmoe-cluster)");
  up_cmd->add_flag("--insecure", up->insecure,
                   "Plain text between all processes, no TLS (a warning is logged)");
  up_cmd->add_flag("--no-auth", up->no_auth, "The gateway takes calls without an API key");
  up_cmd->add_flag("--gateway-require-client-cert", up->gateway_require_client_cert,
                   "The gateway also requires a client certificate (tls/client.pem)");
  up_cmd->add_flag("--json", up->json, "Print one JSON object naming every process");
  up_cmd->callback([up, rc] { *rc = RunClusterUp(*up); });

  auto down = std::make_shared<ClusterDownOptions>();
  auto* down_cmd = cluster->add_subcommand("down", "Stop the cluster started by `cluster up`");
  down_cmd->add_option("--state-dir", down->state_dir,
                       "As given to cluster up (default: .dsmoe-cluster)");
  down_cmd->callback([down, rc] { *rc = RunClusterDown(*down); });
}

void AddPlacement(CLI::App& app, int* rc) {
  auto pl = std::make_shared<PlacementOptions>();
  auto* placement = app.add_subcommand(
      "placement", "Show, plan or change the expert placement of a running cluster");
  placement->require_subcommand(1);
  for (const auto& [name, help] :
       {std::pair{"show", "The placement in use, per-layer load and per-server imbalance"},
        std::pair{"plan", "Plan a placement from the measured load (changes nothing)"},
        std::pair{"apply", "Switch to a planned (or given) placement without stopping"}}) {
    auto* sub = placement->add_subcommand(name, help);
    sub->add_option("--attention", pl->attention,
                    "Attention server addresses, comma-separated (default: the cluster in "
                    "--state-dir)");
    sub->add_option("--state-dir", pl->state_dir,
                    "As given to cluster up: attention servers, CA and client certificate "
                    "(default: .dsmoe-cluster)");
    sub->add_option("--ca", pl->tls.ca, "PEM CA that signed the servers' certificates")
        ->check(CLI::ExistingFile);
    sub->add_option("--cert", pl->tls.cert, "PEM client certificate")->check(CLI::ExistingFile);
    sub->add_option("--key", pl->tls.key, "PEM key of --cert")->check(CLI::ExistingFile);
    sub->add_flag("--insecure", pl->tls.insecure, "Plain text, no TLS");
    sub->add_option("--timeout", pl->timeout_seconds, "Deadline of each call in seconds")
        ->check(CLI::Range(1e-3, kMaxTimeoutSeconds))
        ->capture_default_str();
    sub->add_flag("--json", pl->json, "Print JSON");
    if (std::string(name) == "plan")
      sub->add_option("--out", pl->out, "Write the planned placement JSON here");
    if (std::string(name) == "apply") {
      sub->add_option("--placement", pl->placement,
                      "Placement JSON to switch to (default: plan from the measured load)")
          ->check(CLI::ExistingFile);
      sub->add_flag("--force", pl->force,
                    "Apply --placement even where it leaves a routed expert fewer copies than "
                    "the attention servers' --min-copies");
    }
    sub->callback([pl, rc, name = std::string(name)] {
      pl->action = name;
      *rc = RunPlacement(*pl);
    });
  }
}

}  // namespace

void AddClusterCommands(CLI::App& app, int* rc) {
  AddClusterUpDown(app, rc);
  AddPlacement(app, rc);
}

}  // namespace dsmoe::cli
