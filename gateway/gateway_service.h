// dsmoe-gateway's public API (dsmoe.v1.Gateway): validates and limits requests, relays them to
// the attention servers through an AttentionServerPool (pick, retry, health), turns token ids
// into text (stop strings applied), and reports usage. Cancellation and deadlines of the
// client's call propagate to the attention server, which then frees the sequence's KV cache.
//
// Every method uses gRPC's callback API: a Generate stream is a reactor that writes as tokens
// arrive (one write in flight, the next ones merged while it is), its upstream call a client
// reactor, so no thread waits for a stream. At most max_concurrent requests are relayed at once;
// up to max_queued more wait for a place in arrival order, and beyond that a request is refused
// with RESOURCE_EXHAUSTED naming both limits.
//
// Thread-safe: reactions run on gRPC's threads; shared state is atomic or behind a mutex.
#pragma once

#include <array>
#include <atomic>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "attention-server/client/attention_server_pool.h"
#include "core/model/config.h"
#include "core/rpc/health_checker.h"
#include "core/rpc/metrics.h"
#include "core/rpc/transport_security.h"
#include "core/tokenizer/tokenizer.h"
#include "dsmoe/internal/v1/attention.grpc.pb.h"
#include "dsmoe/v1/gateway.grpc.pb.h"
#include "gateway/auth.h"

namespace dsmoe {

struct GatewayOptions {
  std::string model_name;           // what GenerateRequest.model may say
  int64_t max_prompt_tokens = 0;    // 0: the model's context
  int64_t max_tokens_limit = 4096;  // bound on GenerateRequest.max_tokens
  // Requests (Generate, Complete) relayed at once: bounds the gateway's upstream calls and
  // per-request state; the attention servers queue what their slots cannot run anyway.
  int64_t max_concurrent = 256;
  // Requests waiting for one of those places (arrival order); beyond: RESOURCE_EXHAUSTED. A
  // burst is absorbed as the serving systems users know (vLLM, TGI) do, and memory stays bounded.
  int64_t max_queued = 1024;
  int64_t max_context = 0;                  // the attention servers' context (0: the model's)
  rpc::MetricsRegistry* metrics = nullptr;  // where request metrics go; null: none
  // How attention servers are reached (mutual TLS, or plain text when chosen).
  rpc::TransportSecurity upstream_security;  // default: TLS with the system roots, no identity
  // Who may call (API keys and their rate limits); null: anyone who reaches the port.
  Authenticator* auth = nullptr;
  // The attention servers' health (target i = attention server i), if checked: requests go to
  // serving ones first and never to down ones. Not owned; must outlive the service.
  rpc::HealthChecker* upstream_health = nullptr;
};

// Generate, Complete and Tokenize take their requests as bytes (gRPC's raw callback methods)
// and parse them in the handler (ParseGenerateRequest, ParseTokenizeRequest): a request whose
// string field is not UTF-8 then gets INVALID_ARGUMENT naming the field, where gRPC's own parse
// of a proto3 `string` would answer a bare UNIMPLEMENTED before any handler runs. Their answers
// are serialized here too. The contract (gateway.proto) is unchanged for clients.
using GatewayServiceBase = dsmoe::v1::Gateway::WithRawCallbackMethod_Generate<
    dsmoe::v1::Gateway::WithRawCallbackMethod_Complete<
        dsmoe::v1::Gateway::WithRawCallbackMethod_Tokenize<dsmoe::v1::Gateway::CallbackService>>>;

class GatewayService final : public GatewayServiceBase {
 public:
  // `tokenizer` may be null: then only token-id prompts are accepted.
  GatewayService(const ModelConfig& config, const GenerationConfig& generation,
                 std::unique_ptr<Tokenizer> tokenizer,
                 const std::vector<std::string>& attention_servers, const GatewayOptions& options);
  ~GatewayService();

  // Raw: a serialized GenerateRequest in, serialized GenerateResponses out.
  grpc::ServerWriteReactor<grpc::ByteBuffer>* Generate(grpc::CallbackServerContext* context,
                                                       const grpc::ByteBuffer* request) override;
  // Raw: a serialized GenerateRequest in, a serialized CompleteResponse out.
  grpc::ServerUnaryReactor* Complete(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  // Raw: a serialized TokenizeRequest in, a serialized TokenizeResponse out.
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const grpc::ByteBuffer* request,
                                     grpc::ByteBuffer* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const dsmoe::v1::DetokenizeRequest* request,
                                       dsmoe::v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const dsmoe::v1::GetModelInfoRequest* request,
                                         dsmoe::v1::ModelInfo* response) override;

  // The upstream_health checker's OnChange: when attention server `index` is declared down, its
  // calls in flight are cancelled (requests without tokens yet are then retried elsewhere).
  void OnUpstreamHealth(int index, rpc::TargetHealth now) { pool_.OnHealthChange(index, now); }

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
  // One Generate or Complete from admission to its end (gateway_service.cc).
  class Request;
  class StreamReactor;
  class CompleteReactor;
  // Places for requests being relayed, and the queue of those waiting for one.
  class Admission {
   public:
    Admission(int64_t max_running, int64_t max_queued)
        : max_running_(max_running), max_queued_(max_queued) {}
    enum class Outcome { kRun, kQueued, kRefused };
    // kRun: `r` holds a place now; kQueued: r->Admitted() runs when it gets one.
    Outcome Enter(Request* r);
    // Takes `r` out of the queue; false if it was not (or no longer) waiting.
    bool Remove(Request* r);
    // A running request ended: its place goes to the longest waiting one, if any.
    void Release();
    std::string LimitMessage() const;

   private:
    const int64_t max_running_, max_queued_;
    absl::Mutex mu_;
    int64_t running_ ABSL_GUARDED_BY(mu_) = 0;
    std::deque<Request*> waiting_ ABSL_GUARDED_BY(mu_);
  };

  // Counts a finished call of `method` and returns its status.
  grpc::Status Counted(Method method, grpc::Status status);
  // Admits the call (API key, rate limits) or returns why not; `key` is the caller's key.
  grpc::Status Admit(grpc::CallbackServerContext* context, int* key);
  void CountFinished(dsmoe::v1::FinishReason reason);
  grpc::Status Validate(const dsmoe::v1::GenerateRequest& request,
                        internal::v1::AttentionGenerateRequest* upstream) const;

  grpc::Status TokenizeImpl(const dsmoe::v1::TokenizeRequest* request,
                            dsmoe::v1::TokenizeResponse* response);
  grpc::Status DetokenizeImpl(const dsmoe::v1::DetokenizeRequest* request,
                              dsmoe::v1::DetokenizeResponse* response);
  // What the gateway knows itself (the config, its limits); the expert servers come from an
  // attention server.
  void FillModelInfo(dsmoe::v1::ModelInfo* response);
  // Token `id` decoded alone (special tokens kept), as logprobs report it. REQUIRES: a tokenizer.
  std::string TokenText(uint32_t id) const;

  ModelConfig config_;
  GenerationConfig generation_;
  std::unique_ptr<Tokenizer> tokenizer_;
  GatewayOptions options_;
  AttentionServerPool pool_;
  Admission admission_;
  std::unique_ptr<Metrics> metrics_;  // null without a registry
};

}  // namespace dsmoe
