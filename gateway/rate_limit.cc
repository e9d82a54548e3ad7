#include "gateway/rate_limit.h"

#include <algorithm>
#include <cmath>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"

namespace dsmoe {

namespace {
// Slack for rounding: a caller that waits exactly what TimeUntil said must then pass.
constexpr double kEpsilon = 1e-6;
}  // namespace

TokenBucket::TokenBucket(double rate_per_second, double capacity, SteadyTime now)
    : rate_(rate_per_second), capacity_(capacity), level_(capacity), last_(now) {}

void TokenBucket::Refill(SteadyTime now) {
  if (now <= last_) return;  // a clock read earlier by another caller: nothing to add
  const double seconds = std::chrono::duration<double>(now - last_).count();
  level_ = std::min(capacity_, level_ + seconds * rate_);
  last_ = now;
}

bool TokenBucket::TryTake(double n, SteadyTime now) {
  Refill(now);
  if (level_ + kEpsilon < n) return false;
  level_ -= n;
  return true;
}

void TokenBucket::Charge(double n, SteadyTime now) {
  Refill(now);
  level_ -= n;
}

std::chrono::nanoseconds TokenBucket::TimeUntil(double n, SteadyTime now) {
  Refill(now);
  if (level_ + kEpsilon >= n) return std::chrono::nanoseconds(0);
  return std::chrono::nanoseconds(static_cast<int64_t>(std::ceil((n - level_) / rate_ * 1e9)));
}

double TokenBucket::Level(SteadyTime now) {
  Refill(now);
  return level_;
}

double RateLimits::EffectiveRequestBurst() const {
  return request_burst > 0 ? request_burst : std::max(1.0, requests_per_second);
}

double RateLimits::EffectiveTokenBurst() const {
  return token_burst > 0 ? token_burst : tokens_per_minute;
}

std::string RateLimits::Describe() const {
  const std::string requests = requests_per_second > 0
                                   ? absl::StrFormat("%g requests/s (burst %g)",
                                                     requests_per_second, EffectiveRequestBurst())
                                   : "no request limit";
  const std::string tokens =
      tokens_per_minute > 0
          ? absl::StrFormat("%g tokens/min (burst %g)", tokens_per_minute, EffectiveTokenBurst())
          : "no token limit";
  return absl::StrCat(requests, " and ", tokens);
}

RateLimiter::RateLimiter(int num_keys, const RateLimits& limits, Clock clock)
    : limits_(limits), clock_(std::move(clock)) {
  const SteadyTime now = clock_();
  if (limits_.requests_per_second > 0) {
    requests_.assign(
        num_keys, TokenBucket(limits_.requests_per_second, limits_.EffectiveRequestBurst(), now));
  }
  if (limits_.tokens_per_minute > 0) {
    tokens_.assign(num_keys, TokenBucket(limits_.tokens_per_minute / 60.0,
                                         limits_.EffectiveTokenBurst(), now));
  }
}

RateLimiter::Decision RateLimiter::Admit(int key) {
  Decision d;
  const SteadyTime now = clock_();
  absl::MutexLock lock(&mu_);
  // The token limit first: a request refused for tokens must not use up a request.
  if (!tokens_.empty()) {
    const auto wait = tokens_[key].TimeUntil(1.0, now);
    if (wait.count() > 0) return {false, wait, "tokens"};
  }
  if (!requests_.empty() && !requests_[key].TryTake(1.0, now)) {
    return {false, requests_[key].TimeUntil(1.0, now), "requests"};
  }
  return d;
}

void RateLimiter::ChargeTokens(int key, int64_t tokens) {
  // The limit, not tokens_ (empty exactly when it is off): tokens_ is read under mu_ only.
  if (limits_.tokens_per_minute <= 0 || tokens <= 0) return;
  const SteadyTime now = clock_();
  absl::MutexLock lock(&mu_);
  tokens_[key].Charge(static_cast<double>(tokens), now);
}

}  // namespace dsmoe
