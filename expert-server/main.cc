// dsmoe-expert-server: serves the routed experts a placement assigns to it. Flags -> Options ->
// ExpertServer::Create -> wait for SIGTERM/SIGINT -> Shutdown.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "core/rpc/security_flags.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_flags.h"
#include "core/util/device.h"
#include "expert-server/expert_server.h"

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dsmoe-expert-server: error: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  dsmoe::rpc::BlockShutdownSignals();
  CLI::App app{
      "dsmoe-expert-server: computes routed experts of a DeepSeekMoE model for attention servers"};
  dsmoe::ExpertServerOptions options;
  std::string device_name = "cpu";
  // Mutual TLS by default: only attention servers and the gateway.
  dsmoe::rpc::AddSecurityFlags(app, &options.tls, &options.health_listen);
  app.add_option("--model", options.model_dir, "Checkpoint directory")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--placement", options.placement_file,
                 "Placement JSON (default: round-robin over --servers)")
      ->check(CLI::ExistingFile);
  app.add_option("--servers", options.num_servers, "Number of expert servers (computed placement)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--replicas", options.num_replicas, "Copies of each expert (computed placement)")
      ->check(CLI::Range(1, 4096));
  app.add_option("--server-index", options.server_index, "This server's index in the placement")
      ->check(CLI::Range(0, 4095));
  dsmoe::rpc::AddServingFlags(app, &options.serving);
  app.add_option("--data-listen", options.data_listen,
                 "Where the data plane (ComputeExperts framed over TCP/TLS, the --tls-* security) "
                 "listens, host:port; \"\": none, gRPC only")
      ->capture_default_str();
  app.add_option("--device", device_name,
                 "Where the experts are held and computed: cpu, cuda or cuda:N")
      ->capture_default_str();
  app.add_option("--threads", options.store.threads, "CPU compute threads (default: all cores)")
      ->check(CLI::Range(1, 1024));
  app.add_option("--max-tokens", options.store.max_tokens, "Tokens per request at most")
      ->check(CLI::Range(1, 1 << 20));
  CLI11_PARSE(app, argc, argv);

  const absl::StatusOr<dsmoe::Device> device = dsmoe::ParseDevice(device_name);
  if (!device.ok()) return Fail(device.status());
  options.store.device = *device;
  absl::StatusOr<std::unique_ptr<dsmoe::ExpertServer>> server =
      dsmoe::ExpertServer::Create(std::move(options));
  if (!server.ok()) return Fail(server.status());
  std::printf("dsmoe-expert-server %d %s\n", (*server)->server_index(),
              (*server)->Describe().c_str());
  std::fflush(stdout);
  const int sig = dsmoe::rpc::WaitForShutdownSignal();
  std::printf("dsmoe-expert-server: signal %d, shutting down\n", sig);
  (*server)->Shutdown();
  return 0;
}
