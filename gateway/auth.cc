#include "gateway/auth.h"

#include <google/protobuf/util/time_util.h>

#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "google/rpc/error_details.pb.h"
#include "google/rpc/status.pb.h"

namespace dsmoe {

namespace {

grpc::Status Unauthenticated(const std::string& why) {
  return grpc::Status(grpc::StatusCode::UNAUTHENTICATED,
                      why + "; send `authorization: Bearer <API key>` metadata");
}

// RESOURCE_EXHAUSTED with a google.rpc.Status{code, message, [RetryInfo]} as its details.
grpc::Status Exhausted(const std::string& message, std::chrono::nanoseconds wait) {
  google::rpc::RetryInfo retry;
  *retry.mutable_retry_delay() =
      google::protobuf::util::TimeUtil::NanosecondsToDuration(wait.count());
  google::rpc::Status details;
  details.set_code(static_cast<int>(grpc::StatusCode::RESOURCE_EXHAUSTED));
  details.set_message(message);
  details.add_details()->PackFrom(retry);
  return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, message, details.SerializeAsString());
}

}  // namespace

Authenticator::Authenticator(ApiKeyStore keys, const RateLimits& limits,
                             rpc::MetricsRegistry* metrics, RateLimiter::Clock clock)
    : keys_(std::move(keys)), limiter_(keys_.size(), limits, std::move(clock)) {
  if (metrics != nullptr) {
    auto& refused = metrics->Counter(
        "dsmoe_auth_refused_total",
        "Gateway calls refused before running, by reason (missing or invalid API key, "
        "rate-limited on requests or on generated tokens)");
    missing_ = &refused.Add({{"reason", "missing_key"}});
    invalid_ = &refused.Add({{"reason", "invalid_key"}});
    limited_requests_ = &refused.Add({{"reason", "rate_limited_requests"}});
    limited_tokens_ = &refused.Add({{"reason", "rate_limited_tokens"}});
  }
}

Authenticator::Admission Authenticator::Admit(grpc::ServerContextBase* context) {
  auto count = [](prometheus::Counter* c) {
    if (c != nullptr) c->Increment();
  };
  const auto& metadata = context->client_metadata();
  const auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    count(missing_);
    return {-1, Unauthenticated("no API key")};
  }
  const absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kScheme = "bearer ";  // RFC 6750; schemes are case-insensitive
  if (value.size() <= kScheme.size() ||
      !absl::EqualsIgnoreCase(value.substr(0, kScheme.size()), kScheme)) {
    count(invalid_);
    return {-1, Unauthenticated("the authorization metadata is not `Bearer <API key>`")};
  }
  const absl::string_view presented = absl::StripAsciiWhitespace(value.substr(kScheme.size()));
  const int key = keys_.Find(std::string_view(presented.data(), presented.size()));
  if (key < 0) {
    count(invalid_);
    return {-1, Unauthenticated("the API key is not valid")};
  }
  const RateLimiter::Decision d = limiter_.Admit(key);
  if (!d.admitted) {
    const bool tokens = std::string_view(d.limit) == "tokens";
    count(tokens ? limited_tokens_ : limited_requests_);
    const double seconds = std::chrono::duration<double>(d.retry_after).count();
    context->AddTrailingMetadata("retry-after",
                                 std::to_string(static_cast<int64_t>(std::ceil(seconds))));
    return {-1,
            Exhausted(absl::StrCat("rate limit of API key ", keys_.Label(key), " reached (",
                                   tokens ? "generated tokens per minute" : "requests per second",
                                   "); retry in ", absl::StrFormat("%.3f", seconds), " s"),
                      d.retry_after)};
  }
  return {key, grpc::Status::OK};
}

}  // namespace dsmoe
