// dsmoe-attention-server: attention, KV cache, dense layers, shared experts and the LM head of a
// DeepSeekMoE model, with continuous batching; routed experts on expert servers (or local).
#include <CLI/CLI.hpp>
#include <cstdio>
#include <sstream>

#include "attention-server/attention_service.h"
#include "attention-server/batch_runner_factory.h"
#include "attention-server/placement_service.h"
#include "attention-server/rebalancer.h"
#include "core/rpc/health_checker.h"
#include "core/rpc/health_flags.h"
#include "core/rpc/metrics.h"
#include "core/rpc/readiness.h"
#include "core/rpc/security_flags.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_flags.h"
#include "expert-server/grpc_expert_executor.h"
#include "expert-server/nccl_transport.h"
#include "router/placement.h"

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dsmoe-attention-server: error: %s\n", std::string(s.message()).c_str());
  return 1;
}

// "" when every routed expert has a serving holder; else which ones have none.
std::string MissingExperts(const dsmoe::ModelConfig& config,
                           const dsmoe::router::Placement& placement,
                           const dsmoe::rpc::HealthChecker& health) {
  int64_t num_missing = 0;
  std::string first;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.IsMoeLayer(layer)) continue;
    for (int64_t e = 0; e < config.n_routed_experts; ++e) {
      bool held = false;
      for (int s : placement.Holders(layer, e)) {
        held = held || health.health(s) == dsmoe::rpc::TargetHealth::kServing;
      }
      if (held) continue;
      if (num_missing++ < 8) {
        absl::StrAppend(&first, first.empty() ? "" : ", ", "(", layer, ", ", e, ")");
      }
    }
  }
  if (num_missing == 0) return "";
  return absl::StrCat("no serving expert server holds ", num_missing, " routed experts ", first,
                      num_missing > 8 ? ", ..." : "");
}

}  // namespace

int main(int argc, char** argv) {
  dsmoe::rpc::BlockShutdownSignals();
  CLI::App app{
      "dsmoe-attention-server: the attention side of a DeepSeekMoE model, with continuous "
      "batching"};
  std::string model, expert_servers, placement_file;
  std::string device_name = "cpu", expert_transport = "grpc";
  int threads = 0, replicas = 1, deadline_ms = 10000;
  dsmoe::SchedulerOptions sched;
  dsmoe::rpc::ServingFlags serving;
  dsmoe::rpc::ServerOptions server_options;
  dsmoe::rpc::TransportSecurityOptions tls;  // mutual TLS: only the gateway calls it
  dsmoe::rpc::AddSecurityFlags(app, &tls, &server_options.health_address);
  dsmoe::RebalancerOptions rebalance;
  rebalance.planner.num_replicas = -1;  // default: one per expert server
  double load_window_seconds = 60;
  app.add_option("--model", model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--expert-servers", expert_servers,
                 "Comma-separated expert server addresses, in placement order (none: routed "
                 "experts run here)");
  app.add_option("--placement", placement_file,
                 "Placement JSON (default: round-robin over the expert servers)")
      ->check(CLI::ExistingFile);
  app.add_option("--replicas", replicas, "Copies of each expert in the computed placement")
      ->check(CLI::Range(1, 4096));
  app.add_option("--dispatch-deadline-ms", deadline_ms,
                 "Deadline of each expert-server call (a slower server is taken out)")
      ->check(CLI::Range(1, 3600000))
      ->capture_default_str();
  app.add_option("--expert-transport", expert_transport,
                 "How hidden states reach the expert servers: grpc, or nccl (GPU to GPU, with "
                 "--device cuda and expert servers on GPUs; gRPC where a channel cannot open)")
      ->check(CLI::IsMember({"grpc", "nccl"}))
      ->capture_default_str();
  dsmoe::rpc::HealthCheckFlags health_flags(app, "expert servers");
  app.add_option("--num-slots", sched.num_slots, "Sequences running at once")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  app.add_option("--max-batch-tokens", sched.max_batch_tokens, "Tokens per forward pass")
      ->check(CLI::Range(1, 65536))
      ->capture_default_str();
  app.add_option("--max-context", sched.max_context, "Context per sequence (default: the model's)")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--max-waiting", sched.max_waiting, "Queued sequences at most")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  app.add_option("--device", device_name, "Where the forward pass runs: cpu, cuda or cuda:N")
      ->capture_default_str();
  app.add_option("--threads", threads, "Compute threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  dsmoe::rpc::AddServingFlags(app, &serving);
  app.add_option("--load-window-seconds", load_window_seconds,
                 "Routing load is measured over this recent window (imbalance gauge, planner)")
      ->check(CLI::Range(1.0, 86400.0))
      ->capture_default_str();
  app.add_option("--rebalance-period", rebalance.period_seconds,
                 "Automatic rebalancing: look at the load this often, in seconds (0: off; "
                 "`dsmoe placement apply` works either way)")
      ->check(CLI::Range(0.0, 86400.0))
      ->capture_default_str();
  app.add_option("--rebalance-threshold", rebalance.threshold,
                 "Automatic rebalancing when some MoE layer's per-server load imbalance (max / "
                 "mean over expert servers) exceeds this")
      ->check(CLI::Range(1.0, 1000.0))
      ->capture_default_str();
  app.add_option("--rebalance-replicas", rebalance.planner.num_replicas,
                 "Replica budget of the planner: physical experts per MoE layer beyond one per "
                 "routed expert (default: one per expert server)")
      ->check(CLI::Range(0, 1 << 20));
  app.add_option("--rebalance-slots", rebalance.planner.slots_per_server,
                 "Physical experts an expert server may hold per MoE layer (0: just enough)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  const absl::StatusOr<dsmoe::Device> device = dsmoe::ParseDevice(device_name);
  if (!device.ok()) return Fail(device.status());
  auto security = dsmoe::rpc::TransportSecurity::Load(tls);
  if (!security.ok()) return Fail(security.status());
  server_options.security = *security;

  const std::vector<std::string> addresses = dsmoe::rpc::SplitAddresses(expert_servers);
  dsmoe::WeightSelection selection;
  selection.all_routed_experts = addresses.empty();  // remote experts: load none here
  auto weights = dsmoe::ModelWeights::Load(model, selection);
  if (!weights.ok()) return Fail(weights.status());
  const dsmoe::ModelConfig& config = (*weights)->config();
  // Registered before anything runs, so every series exists from the first scrape.
  dsmoe::rpc::MetricsRegistry metrics(serving.ModelName(model));
  dsmoe::AttentionMetrics attention_metrics(metrics, config, {load_window_seconds, 6});

  std::optional<dsmoe::router::Placement> placement;
  std::unique_ptr<dsmoe::rpc::HealthChecker> expert_health;
  std::unique_ptr<dsmoe::DispatchSideChannel> nccl_links;  // outlives remote (declared first)
  std::unique_ptr<dsmoe::GrpcExpertExecutor> remote;
  if (!addresses.empty()) {
    absl::StatusOr<dsmoe::router::Placement> p = dsmoe::router::Placement::LoadOrCompute(
        placement_file, config, static_cast<int>(addresses.size()), replicas);
    if (!p.ok()) return Fail(p.status());
    if (p->num_servers() != static_cast<int>(addresses.size())) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("the placement names ", p->num_servers(),
                                                          " expert servers but ", addresses.size(),
                                                          " were given")));
    }
    placement.emplace(std::move(*p));
    // An expert server counts only once it answers health checks and holds what the placement
    // says; the first check runs once this server is up (it may start before its experts).
    expert_health = std::make_unique<dsmoe::rpc::HealthChecker>(
        addresses, *security, health_flags.Options("dsmoe-attention-server", "expert server"),
        [&remote](int s) { return remote->VerifyServer(s); });
    dsmoe::GrpcExpertExecutorOptions executor_options;
    executor_options.deadline = std::chrono::milliseconds(deadline_ms);
    executor_options.metrics = &metrics;
    executor_options.security = *security;
    executor_options.health = expert_health.get();
    if (expert_transport == "nccl") {
      absl::StatusOr<std::unique_ptr<dsmoe::DispatchSideChannel>> links = dsmoe::OpenNcclTransport(
          *device, addresses, *security, config.hidden_size, sched.max_batch_tokens);
      if (links.ok()) {
        nccl_links = std::move(*links);
        executor_options.side_channel = nccl_links.get();
      } else {
        std::fprintf(stderr, "dsmoe-attention-server: --expert-transport nccl: %s; using gRPC\n",
                     std::string(links.status().message()).c_str());
      }
    }
    remote = std::make_unique<dsmoe::GrpcExpertExecutor>(config, *placement, addresses,
                                                         executor_options);
  }
  dsmoe::ThreadPool pool(threads);
  auto runner = dsmoe::CreateBatchRunner(*device, **weights, pool, sched, remote.get());
  if (!runner.ok()) return Fail(runner.status());
  auto scheduler = dsmoe::Scheduler::Create(std::move(*runner), sched, &attention_metrics);
  if (!scheduler.ok()) return Fail(scheduler.status());
  std::unique_ptr<dsmoe::Rebalancer> rebalancer;
  if (remote != nullptr) {
    if (rebalance.planner.num_replicas < 0)
      rebalance.planner.num_replicas = static_cast<int>(addresses.size());
    rebalance.security = *security;
    rebalancer = std::make_unique<dsmoe::Rebalancer>(config, **scheduler, *remote,
                                                     attention_metrics.expert_load().window(),
                                                     &metrics, rebalance);
  }
  dsmoe::PlacementService placement_service(rebalancer.get(), config, load_window_seconds);
  dsmoe::AttentionService service(**scheduler, (*weights)->generation_config(),
                                  {addresses, *security});
  // The ready file is written once ready (below).
  if (auto s = serving.Apply(metrics, &server_options); !s.ok()) return Fail(s);
  auto server = dsmoe::rpc::StartServer(server_options, {&service, &placement_service});
  if (!server.ok()) return Fail(server.status());
  // Ready means "can serve": every routed expert reachable on some live expert server.
  dsmoe::rpc::Readiness readiness(
      server->server.get(), dsmoe::internal::v1::AttentionService::service_full_name(),
      serving.ready_file, server->port, server_options.metrics_port, "dsmoe-attention-server");
  if (expert_health == nullptr) {
    readiness.Set(true);
  } else {
    expert_health->Start([&](int, dsmoe::rpc::TargetHealth) {
      const std::string missing = MissingExperts(config, *remote->placement(), *expert_health);
      readiness.Set(missing.empty(), missing);
    });
  }
  std::printf(
      "dsmoe-attention-server serving on %s (%s; %s; %zu expert servers, %lld slots), metrics on "
      "port %d\n",
      server->address().c_str(), device->ToString().c_str(), security->Describe().c_str(),
      addresses.size(), static_cast<long long>(sched.num_slots), server_options.metrics_port);
  std::fflush(stdout);
  const int sig = dsmoe::rpc::WaitForShutdownSignal();
  std::printf("dsmoe-attention-server: signal %d, shutting down\n", sig);
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  expert_health.reset();  // its callback publishes to the server's health service
  metrics.StopServing();  // before the instruments it reads go away
  return 0;
}
