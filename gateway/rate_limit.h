// Per-API-key rate limits of the gateway: requests per second and generated tokens per minute,
// each a token bucket. Time is passed in (a clock function), so tests step it without sleeping.
#pragma once

#include <chrono>
#include <functional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace dsmoe {

using SteadyTime = std::chrono::steady_clock::time_point;

// Holds up to `capacity` tokens, refilled continuously at `rate` per second; starts full.
// Thread-compatible.
class TokenBucket {
 public:
  TokenBucket(double rate_per_second, double capacity, SteadyTime now);

  // Takes `n` tokens if that many are there; otherwise takes none and returns false.
  bool TryTake(double n, SteadyTime now);
  // Takes `n` tokens even below zero: for costs known only afterwards (tokens generated). The
  // debt is repaid by the refill before anything is taken again.
  void Charge(double n, SteadyTime now);
  // How long until `n` tokens are there (zero if they are now). REQUIRES: n <= capacity.
  std::chrono::nanoseconds TimeUntil(double n, SteadyTime now);
  double Level(SteadyTime now);

 private:
  void Refill(SteadyTime now);
  double rate_, capacity_, level_;
  SteadyTime last_;
};

struct RateLimits {
  double requests_per_second = 0;  // 0: no request limit
  double request_burst = 0;        // bucket size; 0: max(1, requests_per_second)
  double tokens_per_minute = 0;    // generated tokens; 0: no token limit
  // Bucket size of generated tokens; 0: tokens_per_minute (one minute's worth).
  double token_burst = 0;
  bool enabled() const { return requests_per_second > 0 || tokens_per_minute > 0; }
  // The bucket sizes in force, the defaults above resolved.
  double EffectiveRequestBurst() const;
  double EffectiveTokenBurst() const;
  // "10 requests/s (burst 20) and 6000 tokens/min (burst 6000)", for the start-up log: the
  // limits as enforced, not as typed.
  std::string Describe() const;
};

// The buckets of every key. A request is admitted when its key's token bucket is not in debt
// and its request bucket has one request; the tokens it generates are charged as they stream
// (a stream under way is never cut off: it may take the bucket into debt, which delays the
// key's next request). Thread-safe.
class RateLimiter {
 public:
  using Clock = std::function<SteadyTime()>;
  RateLimiter(int num_keys, const RateLimits& limits, Clock clock = std::chrono::steady_clock::now);

  struct Decision {
    bool admitted = true;
    std::chrono::nanoseconds retry_after{0};  // when refused: the wait until it would pass
    const char* limit = "";                   // when refused: "requests" or "tokens"
  };
  Decision Admit(int key);
  void ChargeTokens(int key, int64_t tokens);

 private:
  RateLimits limits_;
  Clock clock_;
  absl::Mutex mu_;
  // Per key; empty when that limit is off.
  std::vector<TokenBucket> requests_ ABSL_GUARDED_BY(mu_), tokens_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dsmoe
