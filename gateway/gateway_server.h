// dsmoe-gateway as an object: everything its main used to assemble (the checkpoint's config and
// tokenizer, API keys and rate limits, metrics, the attention servers' health checks, the
// GatewayService, the gRPC server and its readiness), so the main only parses flags and waits
// for a signal, and a test can run a gateway inside its own process. No global state; the
// bound ports are readable.
//
// Thread-safe: port(), address() and metrics_port() are const after Create; Shutdown and Wait
// may be called from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "core/rpc/health_checker.h"
#include "core/rpc/metrics.h"
#include "core/rpc/readiness.h"
#include "core/rpc/server.h"
#include "core/util/log.h"
#include "core/util/status.h"
#include "gateway/auth.h"
#include "gateway/gateway_service.h"
#include "gateway/http/http_server.h"
#include "gateway/http/openai_api.h"

namespace dsmoe {

struct GatewayServerOptions {
  std::string model_dir;  // config.json, generation_config.json, tokenizer.json if any (no weights)
  std::vector<std::string> attention_servers;  // the attention servers requests go to
  // Limits and the model name ("" here: the directory's name). Its metrics, auth and
  // upstream_health are Create's to set; upstream_security is how attention servers are
  // reached (usually server.security).
  GatewayOptions gateway;
  // Where and how the public API serves (address, TLS, message size limit, health port). Its
  // metrics_port is Create's to set.
  rpc::ServerOptions server;
  std::string metrics_listen;  // the Prometheus /metrics endpoint; "": none
  // The ports (rpc::ReadyPorts) written once the attention servers were checked once; "": none.
  std::string ready_file;
  rpc::HealthCheckOptions health;  // checks of the attention servers
  // Who may call: API keys from this file (docs/security.md) with rate_limits, or, with
  // no_auth, anyone who reaches the port. Exactly one of the two.
  std::string api_keys_file;
  bool no_auth = false;
  RateLimits rate_limits;
  // The OpenAI-compatible HTTP API (docs/http-api.md): "" (default) serves none. It serves TLS
  // with server.security's certificate unless that is insecure, and asks the same API keys.
  std::string http_listen;
  http::HttpServerOptions http;  // its limits (address and security are set from the above)
  // A Jinja chat template replacing tokenizer_config.json's chat_template; "": the config's.
  std::string chat_template_file;
  // Where the gateway and everything it owns log (readiness, the attention servers' health,
  // start-up warnings); it replaces server.logger and health.logger. Not owned; must outlive the
  // server. Default: stdout/stderr as always.
  Logger* logger = DefaultLogger();
};

class GatewayServer {
 public:
  // Loads, builds and starts serving; errors name what failed (a file, a flag combination, the
  // address). The attention servers are checked once before it returns.
  static absl::StatusOr<std::unique_ptr<GatewayServer>> Create(GatewayServerOptions options);
  ~GatewayServer();  // Shutdown(now) unless done, then stops the health checks and /metrics
  GatewayServer(const GatewayServer&) = delete;
  GatewayServer& operator=(const GatewayServer&) = delete;

  int port() const { return server_.port; }
  std::string address() const { return server_.address(); }
  int metrics_port() const { return options_.server.metrics_port; }
  // The HTTP API's port (0: not served) and "host:port".
  int http_port() const { return http_ == nullptr ? 0 : http_->port(); }
  std::string http_address() const { return http_ == nullptr ? "" : http_->address(); }
  const std::string& model_name() const { return options_.gateway.model_name; }
  int num_api_keys() const { return auth_ == nullptr ? 0 : auth_->keys().size(); }

  // Refuses new calls at once and lets those in flight finish until `deadline`; the rest are
  // cancelled (their upstream calls with them).
  void Shutdown(std::chrono::system_clock::time_point deadline);
  // Returns once the server has shut down.
  void Wait();

 private:
  explicit GatewayServer(GatewayServerOptions options) : options_(std::move(options)) {}
  absl::Status Start();
  absl::Status StartHttp();

  // Declared in the order they are built; destroyed in reverse (the destructor first stops
  // what calls back into the others: the health checks, the /metrics endpoint).
  GatewayServerOptions options_;
  int64_t max_context_ = 0;  // the model's
  std::unique_ptr<rpc::MetricsRegistry> metrics_;
  std::unique_ptr<Authenticator> auth_;
  std::unique_ptr<rpc::HealthChecker> health_;
  std::unique_ptr<GatewayService> service_;
  rpc::RunningServer server_;
  std::unique_ptr<rpc::Readiness> readiness_;
  // dsmoe_servers_out_of_service{role="attention_server"}.
  std::unique_ptr<rpc::OutOfServiceGauges> attention_servers_out_;
  // The HTTP front: its own tokenizer and chat template, the API over an in-process channel to
  // service_, and the server (stopped first).
  std::unique_ptr<Tokenizer> http_tokenizer_;
  std::unique_ptr<ChatTemplate> chat_template_;
  std::unique_ptr<http::OpenAiApi> openai_;
  std::unique_ptr<http::HttpServer> http_;
  std::atomic<bool> shut_down_{false};
};

}  // namespace dsmoe
