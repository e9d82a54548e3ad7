// Who may call the gateway: an API key in the `authorization: Bearer <key>` metadata, checked
// against the key store, then the key's rate limits. Only the dsmoe.v1.Gateway methods ask;
// health, reflection and /metrics are separate services and need no key.
//
// Refusals: UNAUTHENTICATED (no key, a malformed header, an unknown key); RESOURCE_EXHAUSTED
// when a limit is reached, carrying how long to wait twice: a google.rpc.RetryInfo in the
// status details (the `grpc-status-details-bin` trailer, what gRPC-aware clients read) and a
// `retry-after` trailer in whole seconds (HTTP's convention, for everything else). No message,
// log line or metric label ever holds a key; keys are named by ApiKeyStore::Label.
//
// Thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>

#include "core/rpc/metrics.h"
#include "gateway/api_keys.h"
#include "gateway/rate_limit.h"

namespace dsmoe {

class Authenticator {
 public:
  Authenticator(ApiKeyStore keys, const RateLimits& limits, rpc::MetricsRegistry* metrics = nullptr,
                RateLimiter::Clock clock = std::chrono::steady_clock::now);

  struct Admission {
    int key = -1;         // the caller's key, when admitted
    grpc::Status status;  // OK, or what to return
  };
  // Checks the call's credentials and limits; on refusal also sets the retry trailer.
  Admission Admit(grpc::ServerContextBase* context);
  // Charges `tokens` generated for `key` to its token limit.
  void ChargeTokens(int key, int64_t tokens) { limiter_.ChargeTokens(key, tokens); }

  const ApiKeyStore& keys() const { return keys_; }

 private:
  ApiKeyStore keys_;
  RateLimiter limiter_;
  // Refusals by reason, looked up once (null without a registry).
  prometheus::Counter* missing_ = nullptr;
  prometheus::Counter* invalid_ = nullptr;
  prometheus::Counter* limited_requests_ = nullptr;
  prometheus::Counter* limited_tokens_ = nullptr;
};

}  // namespace dsmoe
