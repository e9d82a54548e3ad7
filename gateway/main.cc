// dsmoe-gateway: the public gRPC API of a dsmoe cluster.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <sstream>

#include "core/model/weights.h"
#include "core/rpc/health_checker.h"
#include "core/rpc/health_flags.h"
#include "core/rpc/metrics.h"
#include "core/rpc/readiness.h"
#include "core/rpc/server.h"
#include "gateway/gateway_service.h"

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dsmoe-gateway: error: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  dsmoe::rpc::BlockShutdownSignals();
  CLI::App app{"dsmoe-gateway: the public gRPC API (dsmoe.v1.Gateway) of a dsmoe cluster"};
  std::string model, attention_servers, expert_servers, listen = "127.0.0.1:0", ready_file,
                                                        metrics_listen = "127.0.0.1:0";
  int grace_seconds = 10, max_request_bytes = 4 << 20;
  dsmoe::GatewayOptions options;
  app.add_option("--model", model,
                 "Checkpoint directory (config and tokenizer are read; no weights)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--model-name", options.model_name,
                 "Name requests may give (default: the directory's name)");
  app.add_option("--attention-servers", attention_servers,
                 "Comma-separated attention server addresses")
      ->required();
  app.add_option("--expert-servers", expert_servers,
                 "Comma-separated expert server addresses (for GetModelInfo)");
  app.add_option("--max-prompt-tokens", options.max_prompt_tokens,
                 "Prompt length limit (default: the context)")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--max-tokens-limit", options.max_tokens_limit, "Bound on max_tokens")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  app.add_option("--max-concurrent", options.max_concurrent, "Requests in flight at most")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-context", options.max_context,
                 "The attention servers' context (default: the model's)")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--max-request-bytes", max_request_bytes, "Largest request message accepted")
      ->check(CLI::Range(1024, 1 << 30))
      ->capture_default_str();
  app.add_option("--grace-seconds", grace_seconds, "On SIGTERM, time given to streams in flight")
      ->check(CLI::Range(0, 3600))
      ->capture_default_str();
  dsmoe::rpc::HealthCheckFlags health_flags(app, "attention servers");
  app.add_option("--listen", listen, "Address to serve on")->capture_default_str();
  app.add_option("--ready-file", ready_file,
                 "Write the bound port (and the metrics port) here once serving");
  app.add_option("--metrics-listen", metrics_listen,
                 "Address of the Prometheus /metrics endpoint (empty: none)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  dsmoe::WeightSelection nothing;
  nothing.attention_side = false;
  nothing.all_routed_experts = false;
  auto weights = dsmoe::ModelWeights::Load(model, nothing);  // config and generation config only
  if (!weights.ok()) return Fail(weights.status());
  if (options.model_name.empty()) options.model_name = dsmoe::rpc::ModelNameFromPath(model);
  dsmoe::rpc::MetricsRegistry metrics(options.model_name);
  options.metrics = &metrics;
  std::unique_ptr<dsmoe::Tokenizer> tokenizer;
  const std::string tokenizer_path = model + "/tokenizer.json";
  if (std::filesystem::exists(tokenizer_path)) {
    auto loaded = dsmoe::Tokenizer::FromFile(tokenizer_path);
    if (!loaded.ok()) return Fail(loaded.status());
    tokenizer = std::move(*loaded);
  }
  // Requests go to attention servers that answer health checks; one that stops answering is
  // taken out (its streams are ended) and rejoins when it answers again.
  auto upstream_health = std::make_unique<dsmoe::rpc::HealthChecker>(
      dsmoe::rpc::SplitAddresses(attention_servers),
      health_flags.Options("dsmoe-gateway", "attention server"));
  options.upstream_health = upstream_health.get();
  dsmoe::GatewayService service((*weights)->config(), (*weights)->generation_config(),
                                std::move(tokenizer), dsmoe::rpc::SplitAddresses(attention_servers),
                                dsmoe::rpc::SplitAddresses(expert_servers), options);
  dsmoe::rpc::ServerOptions server_options;
  server_options.address = listen;
  // The ready file is written once an attention server is ready (below).
  server_options.max_message_bytes = max_request_bytes;
  if (!metrics_listen.empty()) {
    auto port = metrics.Serve(metrics_listen);
    if (!port.ok()) return Fail(port.status());
    server_options.metrics_port = *port;
  }
  auto server = dsmoe::rpc::StartServer(server_options, {&service});
  if (!server.ok()) return Fail(server.status());
  // Ready when at least one attention server is.
  dsmoe::rpc::Readiness readiness(server->server.get(), dsmoe::v1::Gateway::service_full_name(),
                                  ready_file, server->port, server_options.metrics_port,
                                  "dsmoe-gateway");
  upstream_health->Start([&](int index, dsmoe::rpc::TargetHealth now) {
    service.OnUpstreamHealth(index, now);
    bool any = false;
    for (int i = 0; i < upstream_health->num_targets(); ++i) {
      any = any || upstream_health->health(i) == dsmoe::rpc::TargetHealth::kServing;
    }
    readiness.Set(any, "no attention server is ready");
  });
  std::printf("dsmoe-gateway serving model '%s' on %s, metrics on port %d\n",
              options.model_name.c_str(), server->address().c_str(), server_options.metrics_port);
  std::fflush(stdout);
  const int sig = dsmoe::rpc::WaitForShutdownSignal();
  std::printf("dsmoe-gateway: signal %d, finishing streams in flight (up to %d s)\n", sig,
              grace_seconds);
  std::fflush(stdout);
  // Shutdown refuses new calls at once and waits for those in flight up to the deadline.
  server->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(grace_seconds));
  // Stopped before what its callback touches (the readiness, the service) goes away.
  upstream_health.reset();
  metrics.StopServing();
  std::printf("dsmoe-gateway: stopped\n");
  return 0;
}
