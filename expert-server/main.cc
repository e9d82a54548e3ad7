// dsmoe-expert-server: serves the routed experts a placement assigns to it.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>

#include "core/rpc/metrics.h"
#include "core/rpc/security_flags.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_flags.h"
#include "core/util/device.h"
#include "expert-server/expert_service.h"
#include "expert-server/expert_store.h"
#include "router/placement.h"

int main(int argc, char** argv) {
  dsmoe::rpc::BlockShutdownSignals();
  CLI::App app{
      "dsmoe-expert-server: computes routed experts of a DeepSeekMoE model for attention servers"};
  std::string model, placement_file, device_name = "cpu";
  int server_index = 0, servers = 1, replicas = 1;
  dsmoe::ExpertServiceOptions options;
  dsmoe::ExpertStoreOptions store_options;
  dsmoe::rpc::ServingFlags serving;
  dsmoe::rpc::ServerOptions server_options;
  dsmoe::rpc::TransportSecurityOptions tls;  // mutual TLS: only attention servers and the gateway
  dsmoe::rpc::AddSecurityFlags(app, &tls, &server_options.health_address);
  app.add_option("--model", model, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--placement", placement_file,
                 "Placement JSON (default: round-robin over --servers)")
      ->check(CLI::ExistingFile);
  app.add_option("--servers", servers, "Number of expert servers (computed placement)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--replicas", replicas, "Copies of each expert (computed placement)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--server-index", server_index, "This server's index in the placement")
      ->check(CLI::Range(0, 4095));
  dsmoe::rpc::AddServingFlags(app, &serving);
  app.add_option("--device", device_name,
                 "Where the experts are held and computed: cpu, cuda or cuda:N")
      ->capture_default_str();
  app.add_option("--threads", store_options.threads, "CPU compute threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  app.add_option("--max-tokens", store_options.max_tokens, "Tokens per request at most")
      ->check(CLI::Range(1, 1 << 20));
  CLI11_PARSE(app, argc, argv);

  auto fail = [](const absl::Status& s) {
    std::fprintf(stderr, "dsmoe-expert-server: error: %s\n", std::string(s.message()).c_str());
    return 1;
  };
  const absl::StatusOr<dsmoe::Device> device = dsmoe::ParseDevice(device_name);
  if (!device.ok()) return fail(device.status());
  auto security = dsmoe::rpc::TransportSecurity::Load(tls);
  if (!security.ok()) return fail(security.status());
  server_options.security = *security;
  // Placement needs the config; the config comes from the checkpoint.
  auto config_only = dsmoe::ModelWeights::Load(model, dsmoe::WeightSelection::RoutedExperts());
  if (!config_only.ok()) return fail(config_only.status());
  const dsmoe::ModelConfig& config = (*config_only)->config();
  absl::StatusOr<dsmoe::router::Placement> placement =
      dsmoe::router::Placement::LoadOrCompute(placement_file, config, servers, replicas);
  if (!placement.ok()) return fail(placement.status());
  if (server_index >= placement->num_servers()) {
    return fail(absl::InvalidArgumentError(absl::StrCat("--server-index ", server_index,
                                                        " but the placement has ",
                                                        placement->num_servers(), " servers")));
  }
  store_options.device = *device;
  store_options.model_dir = model;  // SetPlacement loads more experts from here
  auto store = dsmoe::OpenExpertStore(store_options, placement->SelectionFor(server_index));
  if (!store.ok()) return fail(store.status());
  dsmoe::rpc::MetricsRegistry metrics(serving.ModelName(model),
                                      {{"expert_server", std::to_string(server_index)}});
  options.metrics = &metrics;
  dsmoe::ExpertService service(std::move(*store), options);
  server_options.ready_file = serving.ready_file;  // ready as soon as it serves
  if (auto s = serving.Apply(metrics, &server_options); !s.ok()) return fail(s);
  auto server = dsmoe::rpc::StartServer(server_options, {&service});
  if (!server.ok()) return fail(server.status());
  // The service's own name answers liveness probes; "" (ready) is SERVING from the start.
  server->server->GetHealthCheckService()->SetServingStatus(
      dsmoe::internal::v1::ExpertService::service_full_name(), true);
  std::printf(
      "dsmoe-expert-server %d serving %lld routed experts on %s (%s, %s), metrics on port %d\n",
      server_index, static_cast<long long>(service.num_experts_held()), server->address().c_str(),
      device->ToString().c_str(), security->Describe().c_str(), server_options.metrics_port);
  std::fflush(stdout);
  const int sig = dsmoe::rpc::WaitForShutdownSignal();
  std::printf("dsmoe-expert-server: signal %d, shutting down\n", sig);
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
  metrics.StopServing();
  return 0;
}
