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
#include "core/rpc/security_flags.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_flags.h"
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
  std::string model, attention_servers;
  int grace_seconds = 10, max_request_bytes = 4 << 20;
  dsmoe::GatewayOptions options;
  dsmoe::rpc::ServingFlags serving;
  dsmoe::rpc::ServerOptions server_options;
  // The public endpoint: TLS; client certificates only if --tls-client-auth=require. Its calls
  // to attention and expert servers present --tls-cert (mutual TLS).
  dsmoe::rpc::TransportSecurityOptions tls;
  tls.require_client_cert = false;
  dsmoe::rpc::AddSecurityFlags(app, &tls, &server_options.health_address);
  std::string api_keys_file;
  bool no_auth = false;
  dsmoe::RateLimits limits;
  app.add_option("--api-keys", api_keys_file,
                 "File of API keys callers must send as `authorization: Bearer <key>` (one per "
                 "line: sha256:<hex digest> or the key; docs/security.md)")
      ->check(CLI::ExistingFile)
      ->group("Security");
  app.add_flag("--no-auth", no_auth, "Accept calls without an API key (a warning is logged)")
      ->group("Security");
  app.add_option("--rate-limit-rps", limits.requests_per_second,
                 "Requests per second per API key (0: no limit)")
      ->check(CLI::Range(0.0, 1e9))
      ->group("Security");
  app.add_option("--rate-limit-burst", limits.request_burst,
                 "Requests an idle key may send at once (default: max(1, --rate-limit-rps))")
      ->check(CLI::Range(1.0, 1e9))
      ->group("Security");
  app.add_option("--rate-limit-tokens-per-minute", limits.tokens_per_minute,
                 "Generated tokens per minute per API key (0: no limit)")
      ->check(CLI::Range(0.0, 1e12))
      ->group("Security");
  app.add_option("--rate-limit-token-burst", limits.token_burst,
                 "Tokens an idle key may generate at once (default: one minute's worth)")
      ->check(CLI::Range(1.0, 1e12))
      ->group("Security");
  app.add_option("--model", model,
                 "Checkpoint directory (config and tokenizer are read; no weights)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--attention-servers", attention_servers,
                 "Comma-separated attention server addresses")
      ->required();
  app.add_option("--max-prompt-tokens", options.max_prompt_tokens,
                 "Prompt length limit (default: the context)")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--max-tokens-limit", options.max_tokens_limit, "Bound on max_tokens")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  app.add_option("--max-concurrent", options.max_concurrent,
                 "Requests relayed at once at most; more wait (--max-queued)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-queued", options.max_queued,
                 "Requests waiting for a place at most; beyond: RESOURCE_EXHAUSTED")
      ->check(CLI::Range(0, 1 << 24))
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
  // The model name is also the `model` label of the gateway's metrics.
  dsmoe::rpc::AddServingFlags(app, &serving,
                              "Name requests may give (default: the directory's name)");
  CLI11_PARSE(app, argc, argv);

  auto security = dsmoe::rpc::TransportSecurity::Load(tls);
  if (!security.ok()) return Fail(security.status());
  server_options.security = *security;
  options.upstream_security = *security;
  if (api_keys_file.empty() == !no_auth) {
    return Fail(absl::InvalidArgumentError(
        no_auth ? "--no-auth and --api-keys exclude each other"
                : "the gateway needs --api-keys FILE (or --no-auth to let anyone call it)"));
  }

  // The config and generation config only.
  auto weights = dsmoe::ModelWeights::Load(model, dsmoe::WeightSelection::RoutedExperts());
  if (!weights.ok()) return Fail(weights.status());
  options.model_name = serving.ModelName(model);
  dsmoe::rpc::MetricsRegistry metrics(options.model_name);
  options.metrics = &metrics;
  std::unique_ptr<dsmoe::Authenticator> auth;
  if (!no_auth) {
    auto keys = dsmoe::ApiKeyStore::LoadFile(api_keys_file);
    if (!keys.ok()) return Fail(keys.status());
    std::printf("dsmoe-gateway: %d API key(s) from %s", keys->size(), api_keys_file.c_str());
    if (limits.enabled()) {
      std::printf(", each limited to %g requests/s (burst %g) and %g tokens/min",
                  limits.requests_per_second, limits.request_burst, limits.tokens_per_minute);
    }
    std::printf("\n");
    auth = std::make_unique<dsmoe::Authenticator>(std::move(*keys), limits, &metrics);
    options.auth = auth.get();
  } else {
    std::fprintf(stderr,
                 "dsmoe-gateway: WARNING: --no-auth: every caller that reaches the port may "
                 "generate\n");
  }
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
      dsmoe::rpc::SplitAddresses(attention_servers), *security,
      health_flags.Options("dsmoe-gateway", "attention server"));
  options.upstream_health = upstream_health.get();
  dsmoe::GatewayService service((*weights)->config(), (*weights)->generation_config(),
                                std::move(tokenizer), dsmoe::rpc::SplitAddresses(attention_servers),
                                options);
  // The ready file is written once the attention servers were checked (below).
  server_options.max_message_bytes = max_request_bytes;
  if (auto s = serving.Apply(metrics, &server_options); !s.ok()) return Fail(s);
  auto server = dsmoe::rpc::StartServer(server_options, {&service});
  if (!server.ok()) return Fail(server.status());
  // Ready (health "") when at least one attention server is. The ready file only says the
  // gateway is up and has checked its attention servers once: it serves whatever they can.
  dsmoe::rpc::Readiness readiness(server->server.get(), dsmoe::v1::Gateway::service_full_name(),
                                  /*ready_file=*/"", server->port, server_options.metrics_port,
                                  "dsmoe-gateway");
  upstream_health->Start([&](int index, dsmoe::rpc::TargetHealth now) {
    service.OnUpstreamHealth(index, now);
    bool any = false;
    for (int i = 0; i < upstream_health->num_targets(); ++i) {
      any = any || upstream_health->health(i) == dsmoe::rpc::TargetHealth::kServing;
    }
    readiness.Set(any, "no attention server is ready");
  });
  if (!serving.ready_file.empty()) {
    if (auto s = dsmoe::rpc::WriteReadyFile(serving.ready_file, server->port,
                                            server_options.metrics_port);
        !s.ok())
      return Fail(s);
  }
  std::printf("dsmoe-gateway serving model '%s' on %s (%s), metrics on port %d\n",
              options.model_name.c_str(), server->address().c_str(), security->Describe().c_str(),
              server_options.metrics_port);
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
