// The OpenAI-compatible HTTP API of the gateway (docs/http-api.md): /v1/models,
// /v1/completions, /v1/chat/completions, /health, /ready, /tokenize, /detokenize.
//
// One request path, two wire formats: every request is checked here for what only HTTP has
// (the JSON body, OpenAI's parameter names, the chat template: completion_request.h), then becomes
// dsmoe.v1.Gateway calls on an in-process channel to the gateway's own GatewayService. So API keys,
// per-key rate limits, request validation, admission (--max-concurrent/--max-queued), the
// attention-server pool with its retries, stop strings, UTF-8-safe text and the request metrics are
// the gRPC API's own, not a copy. n choices are n Generate calls (n sequences in the batch).
//
// Nothing blocks an I/O thread: the Generate calls are gRPC client reactors whose reactions
// format a chunk and hand it to the HttpExchange. A client that hangs up cancels its calls,
// and the attention server frees their sequences.
//
// Thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>

#include "core/rpc/metrics.h"
#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"
#include "dsmoe/v1/gateway.grpc.pb.h"
#include "gateway/api_keys.h"
#include "gateway/http/http_server.h"

namespace dsmoe::http {

struct OpenAiApiOptions {
  std::string model_name;                // the one model /v1/models lists
  int64_t created = 0;                   // its "created" (Unix seconds): when the gateway started
  int64_t max_context = 0;               // tokens of prompt + completion at most
  int64_t max_tokens_limit = 0;          // the gateway's bound on max_tokens
  int max_n = 16;                        // choices per request at most
  const Tokenizer* tokenizer = nullptr;  // null: token-id prompts only, no chat
  const ChatTemplate* chat_template = nullptr;  // null: /v1/chat/completions refuses
  const ApiKeyStore* keys = nullptr;            // null: no API key asked
  std::function<bool()> ready;                  // an attention server is ready
  rpc::MetricsRegistry* metrics = nullptr;      // dsmoe_http_* metrics; null: none
};

class OpenAiApi {
 public:
  // `gateway` is a channel to the GatewayService (in-process); not null.
  OpenAiApi(OpenAiApiOptions options, std::shared_ptr<grpc::Channel> gateway);
  ~OpenAiApi();

  // The HttpServer's handler.
  void Handle(HttpRequest request, std::shared_ptr<HttpExchange> exchange);

 private:
  class Generation;
  struct Metrics;
  struct Reply;
  void Route(const HttpRequest& request, Reply& reply);
  void Completions(const HttpRequest& request, bool chat, Reply& reply);
  void Tokenize(const HttpRequest& request, Reply& reply);
  void Detokenize(const HttpRequest& request, Reply& reply);

  OpenAiApiOptions options_;
  std::unique_ptr<dsmoe::v1::Gateway::Stub> stub_;
  std::unique_ptr<Metrics> metrics_;
};

}  // namespace dsmoe::http
