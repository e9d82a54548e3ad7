// dsmoe-gateway: the public gRPC API of a dsmoe cluster. Flags -> GatewayServerOptions ->
// GatewayServer; then it waits for SIGTERM/SIGINT.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "core/rpc/health_flags.h"
#include "core/rpc/security_flags.h"
#include "core/rpc/server.h"
#include "core/rpc/serving_flags.h"
#include "gateway/gateway_server.h"

namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "dsmoe-gateway: error: %s\n", std::string(s.message()).c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  dsmoe::rpc::BlockShutdownSignals();
  CLI::App app{"dsmoe-gateway: the public gRPC API (dsmoe.v1.Gateway) of a dsmoe cluster"};
  dsmoe::GatewayServerOptions o;
  std::string attention_servers;
  int grace_seconds = 10, max_request_bytes = 4 << 20;
  dsmoe::rpc::ServingFlags serving;
  // The public endpoint: TLS; client certificates only if --tls-client-auth=require. Its calls
  // to attention servers present --tls-cert (mutual TLS).
  dsmoe::rpc::TransportSecurityOptions tls;
  tls.require_client_cert = false;
  dsmoe::rpc::AddSecurityFlags(app, &tls, &o.server.health_address);
  dsmoe::RateLimits& limits = o.rate_limits;
  app.add_option("--api-keys", o.api_keys_file,
                 "File of API keys callers must send as `authorization: Bearer <key>` (one per "
                 "line: sha256:<hex digest> or the key; docs/security.md)")
      ->check(CLI::ExistingFile)
      ->group("Security");
  app.add_flag("--no-auth", o.no_auth, "Accept calls without an API key (a warning is logged)")
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
  app.add_option("--model", o.model_dir,
                 "Checkpoint directory (config and tokenizer are read; no weights)")
      ->required()
      ->check(CLI::ExistingDirectory);
  app.add_option("--attention-servers", attention_servers,
                 "Comma-separated attention server addresses")
      ->required();
  dsmoe::GatewayOptions& gateway = o.gateway;
  app.add_option("--max-prompt-tokens", gateway.max_prompt_tokens,
                 "Prompt length limit (default: the context)")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--max-tokens-limit", gateway.max_tokens_limit, "Bound on max_tokens")
      ->check(CLI::Range(1, 1 << 24))
      ->capture_default_str();
  app.add_option("--max-concurrent", gateway.max_concurrent,
                 "Requests relayed at once at most; more wait (--max-queued)")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str();
  app.add_option("--max-queued", gateway.max_queued,
                 "Requests waiting for a place at most; beyond: RESOURCE_EXHAUSTED")
      ->check(CLI::Range(0, 1 << 24))
      ->capture_default_str();
  app.add_option("--max-context", gateway.max_context,
                 "The attention servers' context (default: the model's)")
      ->check(CLI::Range(1, 1 << 24));
  app.add_option("--max-request-bytes", max_request_bytes, "Largest request message accepted")
      ->check(CLI::Range(1024, 1 << 30))
      ->capture_default_str();
  app.add_option("--grace-seconds", grace_seconds, "On SIGTERM, time given to streams in flight")
      ->check(CLI::Range(0, 3600))
      ->capture_default_str();
  app.add_option("--http-listen", o.http_listen,
                 "Also serve the OpenAI-compatible HTTP API here (host:port; docs/http-api.md); "
                 "same TLS certificate and API keys as the gRPC API. Default: off")
      ->group("HTTP API");
  app.add_option("--chat-template", o.chat_template_file,
                 "Jinja chat template replacing tokenizer_config.json's chat_template")
      ->check(CLI::ExistingFile)
      ->group("HTTP API");
  app.add_option("--http-max-connections", o.http.max_connections,
                 "Open HTTP connections at most; one more is answered 503")
      ->check(CLI::Range(1, 1 << 20))
      ->capture_default_str()
      ->group("HTTP API");
  dsmoe::rpc::HealthCheckFlags health_flags(app, "attention servers");
  // The model name is also the `model` label of the gateway's metrics.
  dsmoe::rpc::AddServingFlags(app, &serving,
                              "Name requests may give (default: the directory's name)");
  CLI11_PARSE(app, argc, argv);

  auto security = dsmoe::rpc::TransportSecurity::Load(tls);
  if (!security.ok()) return Fail(security.status());
  o.server.security = *security;
  o.server.address = serving.listen;
  o.server.max_message_bytes = max_request_bytes;
  o.gateway.upstream_security = *security;
  o.gateway.model_name = serving.model_name;
  o.attention_servers = dsmoe::rpc::SplitAddresses(attention_servers);
  o.metrics_listen = serving.metrics_listen;
  o.http.max_body_bytes = static_cast<size_t>(max_request_bytes);
  o.ready_file = serving.ready_file;
  o.health = health_flags.Options("dsmoe-gateway", "attention server");
  if (o.no_auth) {
    std::fprintf(stderr,
                 "dsmoe-gateway: WARNING: --no-auth: every caller that reaches the port may "
                 "generate\n");
  }
  auto server = dsmoe::GatewayServer::Create(o);
  if (!server.ok()) return Fail(server.status());
  if (!o.no_auth) {
    std::printf("dsmoe-gateway: %d API key(s) from %s", (*server)->num_api_keys(),
                o.api_keys_file.c_str());
    if (limits.enabled()) {
      std::printf(", each limited to %s", limits.Describe().c_str());
    }
    std::printf("\n");
  }
  std::printf("dsmoe-gateway serving model '%s' on %s (%s), metrics on port %d\n",
              (*server)->model_name().c_str(), (*server)->address().c_str(),
              security->Describe().c_str(), (*server)->metrics_port());
  if ((*server)->http_port() != 0) {
    std::printf("dsmoe-gateway: OpenAI-compatible HTTP API on %s (%s)\n",
                (*server)->http_address().c_str(), security->insecure() ? "http" : "https");
  }
  std::fflush(stdout);
  const int sig = dsmoe::rpc::WaitForShutdownSignal();
  std::printf("dsmoe-gateway: signal %d, finishing streams in flight (up to %d s)\n", sig,
              grace_seconds);
  std::fflush(stdout);
  // Shutdown refuses new calls at once and waits for those in flight up to the deadline.
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(grace_seconds));
  server->reset();
  std::printf("dsmoe-gateway: stopped\n");
  return 0;
}
