#include "gateway/gateway_server.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <utility>

#include "core/io/mapped_file.h"
#include "core/model/weights.h"
#include "core/tokenizer/tokenizer.h"

namespace dsmoe {

absl::StatusOr<std::unique_ptr<GatewayServer>> GatewayServer::Create(GatewayServerOptions options) {
  if (options.api_keys_file.empty() == !options.no_auth) {
    return absl::InvalidArgumentError(
        options.no_auth ? "--no-auth and --api-keys exclude each other"
                        : "the gateway needs --api-keys FILE (or --no-auth to let anyone call it)");
  }
  if (options.attention_servers.empty())
    return absl::InvalidArgumentError("the gateway needs at least one attention server");
  std::unique_ptr<GatewayServer> server(new GatewayServer(std::move(options)));
  DSMOE_RETURN_IF_ERROR(server->Start());
  return server;
}

absl::Status GatewayServer::Start() {
  GatewayOptions& o = options_.gateway;
  // The config and generation config only.
  DSMOE_ASSIGN_OR_RETURN(auto weights,
                         ModelWeights::Load(options_.model_dir, WeightSelection::RoutedExperts()));
  if (o.model_name.empty()) o.model_name = rpc::ModelNameFromPath(options_.model_dir);
  // The model name is also the `model` label of the gateway's metrics.
  metrics_ = std::make_unique<rpc::MetricsRegistry>(o.model_name);
  o.metrics = metrics_.get();
  if (!options_.no_auth) {
    DSMOE_ASSIGN_OR_RETURN(ApiKeyStore keys, ApiKeyStore::LoadFile(options_.api_keys_file));
    auth_ = std::make_unique<Authenticator>(std::move(keys), options_.rate_limits, metrics_.get());
    o.auth = auth_.get();
  }
  std::unique_ptr<Tokenizer> tokenizer;
  const std::string tokenizer_path = options_.model_dir + "/tokenizer.json";
  if (std::filesystem::exists(tokenizer_path)) {
    DSMOE_ASSIGN_OR_RETURN(tokenizer, Tokenizer::FromFile(tokenizer_path));
  }
  // Requests go to attention servers that answer health checks; one that stops answering is
  // taken out (its streams are ended) and rejoins when it answers again.
  rpc::HealthCheckOptions health = options_.health;
  health.logger = options_.logger;
  health_ = std::make_unique<rpc::HealthChecker>(options_.attention_servers, o.upstream_security,
                                                 std::move(health));
  o.upstream_health = health_.get();
  max_context_ = weights->config().max_position_embeddings;
  service_ = std::make_unique<GatewayService>(weights->config(), weights->generation_config(),
                                              std::move(tokenizer), options_.attention_servers, o);
  if (!options_.metrics_listen.empty()) {
    DSMOE_ASSIGN_OR_RETURN(options_.server.metrics_port, metrics_->Serve(options_.metrics_listen));
  }
  // The ready file is written once the attention servers were checked (below), not at start.
  rpc::ServerOptions server_options = options_.server;
  server_options.ready_file.clear();
  server_options.logger = options_.logger;
  DSMOE_ASSIGN_OR_RETURN(server_, rpc::StartServer(server_options, {service_.get()}));
  // Ready (health "") when at least one attention server is. The ready file only says the
  // gateway is up and has checked its attention servers once: it serves whatever they can.
  readiness_ = std::make_unique<rpc::Readiness>(
      server_.server.get(), dsmoe::v1::Gateway::service_full_name(), /*ready_file=*/"",
      rpc::ReadyPorts{server_.port, options_.server.metrics_port, server_.health_port},
      "dsmoe-gateway", options_.logger);
  attention_servers_out_ = std::make_unique<rpc::OutOfServiceGauges>(*metrics_, "attention_server");
  health_->Start([this](int index, rpc::TargetHealth now) {
    service_->OnUpstreamHealth(index, now);
    attention_servers_out_->Update(*health_);
    bool any = false;
    for (int i = 0; i < health_->num_targets(); ++i)
      any = any || health_->health(i) == rpc::TargetHealth::kServing;
    readiness_->Set(any, "no attention server is ready");
  });
  attention_servers_out_->Update(*health_);  // servers down from the start never change
  if (!options_.http_listen.empty()) DSMOE_RETURN_IF_ERROR(StartHttp());
  if (!options_.ready_file.empty()) {
    DSMOE_RETURN_IF_ERROR(rpc::WriteReadyFile(
        options_.ready_file, {server_.port, options_.server.metrics_port, server_.health_port,
                              http_ != nullptr ? http_->port() : 0}));
  }
  return absl::OkStatus();
}

absl::Status GatewayServer::StartHttp() {
  const GatewayOptions& o = options_.gateway;
  const std::filesystem::path dir(options_.model_dir);
  if (std::filesystem::exists(dir / "tokenizer.json")) {
    DSMOE_ASSIGN_OR_RETURN(http_tokenizer_, Tokenizer::FromFile((dir / "tokenizer.json").string()));
  }
  // A template that uses something the renderer lacks is refused here, at start-up.
  if (!options_.chat_template_file.empty()) {
    std::ifstream in(options_.chat_template_file);
    if (!in) {
      return absl::NotFoundError(
          absl::StrCat("--chat-template: cannot read ", options_.chat_template_file));
    }
    std::stringstream source;
    source << in.rdbuf();
    nlohmann::json special = nlohmann::json::object();
    if (http_tokenizer_ != nullptr) {
      if (auto bos = http_tokenizer_->bos_id())
        special["bos_token"] = http_tokenizer_->IdToToken(*bos).value_or("");
      if (auto eos = http_tokenizer_->eos_id())
        special["eos_token"] = http_tokenizer_->IdToToken(*eos).value_or("");
    }
    auto t = ChatTemplate::Parse(source.str(), special);
    if (!t.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--chat-template ", options_.chat_template_file, ": ", t.status().message()));
    }
    chat_template_ = std::move(*t);
  } else if (std::filesystem::exists(dir / "tokenizer_config.json")) {
    auto t = ChatTemplate::FromTokenizerConfig((dir / "tokenizer_config.json").string());
    if (t.ok()) {
      chat_template_ = std::move(*t);
    } else if (t.status().code() != absl::StatusCode::kNotFound) {
      return t.status();
    }
  }
  http::OpenAiApiOptions api;
  api.model_name = o.model_name;
  api.created = std::chrono::duration_cast<std::chrono::seconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count();
  api.max_context = o.max_context > 0 ? o.max_context : max_context_;
  api.max_tokens_limit = o.max_tokens_limit;
  api.tokenizer = http_tokenizer_.get();
  api.chat_template = chat_template_.get();
  api.keys = auth_ == nullptr ? nullptr : &auth_->keys();
  api.metrics = metrics_.get();
  api.ready = [this] {
    for (int i = 0; i < health_->num_targets(); ++i)
      if (health_->health(i) == rpc::TargetHealth::kServing) return true;
    return false;
  };
  // One request path: the HTTP API calls this gateway's own service, in process.
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  openai_ =
      std::make_unique<http::OpenAiApi>(std::move(api), server_.server->InProcessChannel(args));
  http::HttpServerOptions h = options_.http;
  h.address = options_.http_listen;
  h.security = options_.server.security;
  DSMOE_ASSIGN_OR_RETURN(
      http_, http::HttpServer::Start(
                 std::move(h), [this](http::HttpRequest r, std::shared_ptr<http::HttpExchange> e) {
                   openai_->Handle(std::move(r), std::move(e));
                 }));
  return absl::OkStatus();
}

void GatewayServer::Shutdown(std::chrono::system_clock::time_point deadline) {
  // The HTTP front first: its requests' gRPC calls are cancelled (their clients hear it).
  if (http_ != nullptr) http_->Stop();
  if (server_.server != nullptr) server_.server->Shutdown(deadline);
  shut_down_ = true;
}

void GatewayServer::Wait() {
  if (server_.server != nullptr) server_.server->Wait();
}

GatewayServer::~GatewayServer() {
  if (!shut_down_) Shutdown(std::chrono::system_clock::now());
  // Stopped before what their callbacks touch (the readiness, the service, the instruments, the
  // checker itself: a callback running now still finds health_ set, as reset() would not leave
  // it while the checker's thread is joined).
  if (health_ != nullptr) health_->Stop();
  health_.reset();
  if (metrics_ != nullptr) metrics_->StopServing();
}

}  // namespace dsmoe
