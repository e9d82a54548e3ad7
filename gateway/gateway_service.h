// dsmoe-gateway's public API (dsmoe.v1.Gateway): validates and limits requests, spreads them
// over the attention servers (fewest requests in flight first), relays their token streams,
// and reports usage. Cancellation and deadlines of the client's call propagate to the
// attention server, which then frees the sequence's KV cache.
//
// Thread-safe: handlers run on gRPC's threads; shared state is atomic or behind a mutex.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "core/rpc/health_checker.h"
#include "core/rpc/metrics.h"
#include "core/rpc/transport_security.h"
#include "core/tokenizer/tokenizer.h"
#include "dsmoe/internal/v1/attention.grpc.pb.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"
#include "dsmoe/v1/gateway.grpc.pb.h"
#include "gateway/auth.h"

namespace dsmoe {

struct GatewayOptions {
  std::string model_name;                   // what GenerateRequest.model may say
  int64_t max_prompt_tokens = 0;            // 0: the model's context
  int64_t max_tokens_limit = 4096;          // bound on GenerateRequest.max_tokens
  int64_t max_concurrent = 256;             // requests in flight; beyond: RESOURCE_EXHAUSTED
  int64_t max_context = 0;                  // the attention servers' context (0: the model's)
  rpc::MetricsRegistry* metrics = nullptr;  // where request metrics go; null: none
  // How attention and expert servers are reached (mutual TLS, or plain text when chosen).
  rpc::TransportSecurity upstream_security;  // default: TLS with the system roots, no identity
  // Who may call (API keys and their rate limits); null: anyone who reaches the port.
  Authenticator* auth = nullptr;
  // The attention servers' health (target i = attention server i), if checked: requests go to
  // serving ones first and never to down ones. Not owned; must outlive the service.
  rpc::HealthChecker* upstream_health = nullptr;
};

class GatewayService final : public dsmoe::v1::Gateway::Service {
 public:
  // `tokenizer` may be null: then only token-id prompts are accepted.
  GatewayService(const ModelConfig& config, const GenerationConfig& generation,
                 std::unique_ptr<Tokenizer> tokenizer,
                 const std::vector<std::string>& attention_servers,
                 const std::vector<std::string>& expert_servers, const GatewayOptions& options);

  grpc::Status Generate(grpc::ServerContext* context, const dsmoe::v1::GenerateRequest* request,
                        grpc::ServerWriter<dsmoe::v1::GenerateResponse>* writer) override;
  grpc::Status Complete(grpc::ServerContext* context, const dsmoe::v1::GenerateRequest* request,
                        dsmoe::v1::CompleteResponse* response) override;
  grpc::Status Tokenize(grpc::ServerContext* context, const dsmoe::v1::TokenizeRequest* request,
                        dsmoe::v1::TokenizeResponse* response) override;
  grpc::Status Detokenize(grpc::ServerContext* context, const dsmoe::v1::DetokenizeRequest* request,
                          dsmoe::v1::DetokenizeResponse* response) override;
  grpc::Status GetModelInfo(grpc::ServerContext* context,
                            const dsmoe::v1::GetModelInfoRequest* request,
                            dsmoe::v1::ModelInfo* response) override;

  // The upstream_health checker's OnChange: when attention server `index` is declared down, its
  // calls in flight are cancelled (requests without tokens yet are then retried elsewhere).
  void OnUpstreamHealth(int index, rpc::TargetHealth now);

 private:
  enum Method { kGenerate, kComplete, kTokenize, kDetokenize, kGetModelInfo, kNumMethods };
  // Request instruments, looked up once (docs/metrics.md).
  struct Metrics {
    explicit Metrics(rpc::MetricsRegistry& registry);
    std::array<rpc::CodeCounters, kNumMethods> requests;  // by method and gRPC code
    prometheus::Counter* finished_stop;
    prometheus::Counter* finished_length;
    prometheus::Counter* finished_abort;
    prometheus::Histogram* ttft;
    prometheus::Histogram* inter_token;
    prometheus::Histogram* e2e;
    prometheus::Gauge* in_flight;
  };
  // Counts a finished call of `method` and returns its status.
  grpc::Status Counted(Method method, grpc::Status status);
  // Admits the call (API key, rate limits) or returns why not; `key` is the caller's key.
  grpc::Status Admit(grpc::ServerContext* context, int* key);
  void CountFinished(dsmoe::v1::FinishReason reason);

  grpc::Status GenerateImpl(grpc::ServerContext* context, const dsmoe::v1::GenerateRequest* request,
                            int key, grpc::ServerWriter<dsmoe::v1::GenerateResponse>* writer);
  grpc::Status CompleteImpl(grpc::ServerContext* context, const dsmoe::v1::GenerateRequest* request,
                            int key, dsmoe::v1::CompleteResponse* response);
  grpc::Status TokenizeImpl(const dsmoe::v1::TokenizeRequest* request,
                            dsmoe::v1::TokenizeResponse* response);
  grpc::Status DetokenizeImpl(const dsmoe::v1::DetokenizeRequest* request,
                              dsmoe::v1::DetokenizeResponse* response);
  grpc::Status GetModelInfoImpl(grpc::ServerContext* context, dsmoe::v1::ModelInfo* response);

  // An upstream call in flight, which a "down" verdict on its server cancels.
  struct ActiveCall {
    grpc::ClientContext* context;
    bool aborted = false;  // guarded by the upstream's mu
  };
  struct Upstream {
    int index = 0;
    std::string address;
    std::unique_ptr<internal::v1::AttentionService::Stub> stub;
    std::atomic<int64_t> in_flight{0};
    std::mutex mu;
    std::set<ActiveCall*> calls;  // guarded by mu
  };
  // Receives each upstream message; returns false to stop relaying (the client went away).
  using OnMessage = std::function<bool(const internal::v1::AttentionGenerateResponse&)>;

  grpc::Status Validate(const dsmoe::v1::GenerateRequest& request,
                        internal::v1::AttentionGenerateRequest* upstream) const;
  // Runs a validated request, calling `emit` with each batch of new token ids and their text
  // (stop strings applied), then returns the finish reason in `finish`.
  using Emit = std::function<bool(const google::protobuf::RepeatedField<uint32_t>& ids,
                                  const std::string& text)>;
  // Generated tokens are charged to API key `key` (if any) as they arrive.
  grpc::Status Run(grpc::ServerContext* context, const dsmoe::v1::GenerateRequest& request,
                   const internal::v1::AttentionGenerateRequest& upstream, int key,
                   const Emit& emit, dsmoe::v1::FinishReason* finish, double* ttft);
  // Runs one request on the best attention server (Pick), relaying its messages; retries on
  // another one while the request has produced no tokens.
  grpc::Status Relay(grpc::ServerContext* context,
                     const internal::v1::AttentionGenerateRequest& request,
                     const OnMessage& on_message);
  // One attempt on `upstream`; `tokens` counts the token ids relayed.
  grpc::Status RelayOnce(grpc::ServerContext* context, Upstream& upstream,
                         const internal::v1::AttentionGenerateRequest& request,
                         const OnMessage& on_message, int64_t* tokens);
  // The attention server to try next among those not yet `tried`; null if none is left.
  Upstream* Pick(const std::vector<bool>& tried) const;
  rpc::TargetHealth UpstreamHealth(int index) const;

  ModelConfig config_;
  GenerationConfig generation_;
  std::unique_ptr<Tokenizer> tokenizer_;
  GatewayOptions options_;
  std::vector<std::unique_ptr<Upstream>> upstreams_;
  std::vector<std::string> expert_servers_;
  std::atomic<int64_t> in_flight_{0};
  std::unique_ptr<Metrics> metrics_;  // null without a registry
};

}  // namespace dsmoe
