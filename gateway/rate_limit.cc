#include "gateway/rate_limit.h"

#include <algorithm>
#include <cmath>

#include "absl/base/thread_annotations.h"
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

RateLimiter::RateLimiter(int num_keys, const RateLimits& limits, Clock clock)
    : limits_(limits), clock_(std::move(clock)) {
  const SteadyTime now = clock_();
  if (limits_.requests_per_second > 0) {
    const double burst = limits_.request_burst > 0 ? limits_.request_burst
                                                   : std::max(1.0, limits_.requests_per_second);
    requests_.assign(num_keys, TokenBucket(limits_.requests_per_second, burst, now));
  }
  if (limits_.tokens_per_minute > 0) {
    const double burst = limits_.token_burst > 0 ? limits_.token_burst : limits_.tokens_per_minute;
    tokens_.assign(num_keys, TokenBucket(limits_.tokens_per_minute / 60.0, burst, now));
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
