// The gateway's API-key store (hashing, lookup, key-file parsing) and its rate limits (token
// buckets on an injected clock: no sleeps). References: the FIPS 180-2 SHA-256 test vectors
// and token counts worked out by hand.
#include <gtest/gtest.h>

#include <chrono>
#include <string>

#include "gateway/api_keys.h"
#include "gateway/rate_limit.h"

namespace dsmoe {
namespace {

using std::chrono::milliseconds;
using std::chrono::seconds;

constexpr char kKeyA[] = "alpha-key-0123456789";
constexpr char kKeyB[] = "bravo-key-0123456789";

TEST(ApiKeyStore, Sha256MatchesTheStandardVectors) {
  EXPECT_EQ(ApiKeyStore::Hex(ApiKeyStore::Sha256("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(ApiKeyStore::Hex(ApiKeyStore::Sha256("")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(ApiKeyStore::Hex(
                ApiKeyStore::Sha256("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq")),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(ApiKeyStore, FindsPlainAndHashedKeysAndNothingElse) {
  const std::string text = absl::StrCat("# the keys of the test\n\n", kKeyA,
                                        "\n  sha256:", ApiKeyStore::Hex(ApiKeyStore::Sha256(kKeyB)),
                                        "   # bravo, stored as its digest\n");
  auto store = ApiKeyStore::Parse(text, "keys.txt");
  ASSERT_TRUE(store.ok()) << store.status();
  ASSERT_EQ(store->size(), 2);
  EXPECT_EQ(store->Find(kKeyA), 0);
  EXPECT_EQ(store->Find(kKeyB), 1);
  EXPECT_EQ(store->Find(""), -1);
  EXPECT_EQ(store->Find("alpha-key-012345678"), -1);                         // a prefix
  EXPECT_EQ(store->Find("alpha-key-01234567890"), -1);                       // an extension
  EXPECT_EQ(store->Find(ApiKeyStore::Hex(ApiKeyStore::Sha256(kKeyB))), -1);  // the digest itself
  // Labels name the digest's prefix, never the key.
  EXPECT_EQ(store->Label(1), "key-" + ApiKeyStore::Hex(ApiKeyStore::Sha256(kKeyB)).substr(0, 8));
  EXPECT_EQ(store->Label(0).find("alpha"), std::string::npos);
}

TEST(ApiKeyStore, UppercaseHexDigestsAreAccepted) {
  std::string hex = ApiKeyStore::Hex(ApiKeyStore::Sha256(kKeyA));
  for (char& c : hex) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  auto store = ApiKeyStore::Parse("sha256:" + hex, "keys.txt");
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ(store->Find(kKeyA), 0);
}

// Each bad file is refused with a message naming the file and line and what is wrong, and
// never quoting the line (it may hold a key).
TEST(ApiKeyStore, FileErrorsNameTheLineAndNeverTheKey) {
  struct Case {
    std::string text, want;
  };
  const std::string digest = ApiKeyStore::Hex(ApiKeyStore::Sha256(kKeyA));
  const Case cases[] = {
      {"", "no API keys"},
      {"# only a comment\n\n", "no API keys"},
      {"short-key-123", "line 1: a key must have at least 16 characters, this one has 13"},
      {"\nsecret key with spaces", "line 2: a key may hold only"},
      {"sha256:" + digest.substr(0, 63),
       "line 1: a sha256: entry needs 64 hex digits, this one "
       "has 63"},
      {"sha256:" + digest.substr(0, 63) + "g", "line 1: a sha256: entry holds a character"},
      {absl::StrCat(kKeyA, "\n\nsha256:", digest), "line 3: the same key as line 1"},
  };
  for (const Case& c : cases) {
    auto store = ApiKeyStore::Parse(c.text, "keys.txt");
    ASSERT_FALSE(store.ok()) << c.text;
    EXPECT_EQ(store.status().code(), absl::StatusCode::kInvalidArgument);
    const std::string message(store.status().message());
    EXPECT_NE(message.find("keys.txt"), std::string::npos) << message;
    EXPECT_NE(message.find(c.want), std::string::npos) << message;
    EXPECT_EQ(message.find("secret"), std::string::npos) << message;
    EXPECT_EQ(message.find("short-key"), std::string::npos) << message;
  }
}

TEST(ApiKeyStore, MissingFileIsAnError) {
  auto store = ApiKeyStore::LoadFile("/nonexistent/dsmoe-keys");
  ASSERT_FALSE(store.ok());
  EXPECT_NE(std::string(store.status().message()).find("/nonexistent/dsmoe-keys"),
            std::string::npos);
}

TEST(TokenBucket, StartsFullRefillsAtItsRateAndCapsAtItsCapacity) {
  const SteadyTime t0{};
  TokenBucket b(/*rate_per_second=*/2, /*capacity=*/3, t0);
  EXPECT_TRUE(b.TryTake(1, t0));
  EXPECT_TRUE(b.TryTake(1, t0));
  EXPECT_TRUE(b.TryTake(1, t0));
  EXPECT_FALSE(b.TryTake(1, t0));  // empty: nothing taken
  EXPECT_DOUBLE_EQ(b.Level(t0), 0);
  // 1 token per 0.5 s.
  EXPECT_EQ(b.TimeUntil(1, t0), milliseconds(500));
  EXPECT_FALSE(b.TryTake(1, t0 + milliseconds(499)));
  EXPECT_TRUE(b.TryTake(1, t0 + milliseconds(500)));
  // Idle for an hour: full again, not more.
  EXPECT_DOUBLE_EQ(b.Level(t0 + seconds(3600)), 3);
  EXPECT_FALSE(b.TryTake(4, t0 + seconds(3600)));
  EXPECT_DOUBLE_EQ(b.Level(t0 + seconds(3600)), 3);  // a refused take takes nothing
}

TEST(TokenBucket, ChargeGoesIntoDebtThatTheRefillRepays) {
  const SteadyTime t0{};
  TokenBucket b(/*rate_per_second=*/10, /*capacity=*/100, t0);
  b.Charge(130, t0);  // 30 in debt
  EXPECT_DOUBLE_EQ(b.Level(t0), -30);
  EXPECT_EQ(b.TimeUntil(1, t0), milliseconds(3100));  // (1 + 30) / 10 per s
  EXPECT_DOUBLE_EQ(b.Level(t0 + seconds(3)), 0);
  EXPECT_TRUE(b.TryTake(1, t0 + milliseconds(3100)));
}

TEST(TokenBucket, AnEarlierTimeAddsNothing) {
  const SteadyTime t0 = SteadyTime{} + seconds(10);
  TokenBucket b(1, 5, t0);
  b.Charge(5, t0);
  EXPECT_DOUBLE_EQ(b.Level(t0 - seconds(5)), 0);
  EXPECT_DOUBLE_EQ(b.Level(t0 + seconds(2)), 2);
}

// A clock the test moves.
struct FakeClock {
  SteadyTime now{};
  RateLimiter::Clock fn() {
    return [this] { return now; };
  }
};

TEST(RateLimits, DescribeSaysTheLimitsInForce) {
  RateLimits defaults;
  defaults.requests_per_second = 2.5;  // burst unset: max(1, rate) = 2.5
  defaults.tokens_per_minute = 600;    // burst unset: a minute's worth
  EXPECT_EQ(defaults.Describe(), "2.5 requests/s (burst 2.5) and 600 tokens/min (burst 600)");
  RateLimits slow;
  slow.requests_per_second = 0.5;  // burst unset: at least one request
  slow.token_burst = 10;
  EXPECT_EQ(slow.Describe(), "0.5 requests/s (burst 1) and no token limit");
  RateLimits given;
  given.requests_per_second = 10;
  given.request_burst = 40;
  EXPECT_EQ(given.Describe(), "10 requests/s (burst 40) and no token limit");
}

TEST(RateLimiter, RequestsPerSecondPerKey) {
  FakeClock clock;
  RateLimits limits;
  limits.requests_per_second = 2;
  limits.request_burst = 2;
  RateLimiter limiter(/*num_keys=*/2, limits, clock.fn());
  EXPECT_TRUE(limiter.Admit(0).admitted);
  EXPECT_TRUE(limiter.Admit(0).admitted);
  const RateLimiter::Decision refused = limiter.Admit(0);
  EXPECT_FALSE(refused.admitted);
  EXPECT_STREQ(refused.limit, "requests");
  EXPECT_EQ(refused.retry_after, milliseconds(500));
  EXPECT_TRUE(limiter.Admit(1).admitted);  // the other key has its own bucket
  clock.now += milliseconds(500);
  EXPECT_TRUE(limiter.Admit(0).admitted);
  EXPECT_FALSE(limiter.Admit(0).admitted);
}

TEST(RateLimiter, GeneratedTokensPerMinute) {
  FakeClock clock;
  RateLimits limits;
  limits.tokens_per_minute = 600;  // 10 per second, bucket of 600
  RateLimiter limiter(1, limits, clock.fn());
  EXPECT_TRUE(limiter.Admit(0).admitted);
  limiter.ChargeTokens(0, 400);
  EXPECT_TRUE(limiter.Admit(0).admitted);  // 200 left
  limiter.ChargeTokens(0, 250);            // a stream under way may go 50 into debt
  const RateLimiter::Decision refused = limiter.Admit(0);
  EXPECT_FALSE(refused.admitted);
  EXPECT_STREQ(refused.limit, "tokens");
  EXPECT_EQ(refused.retry_after, milliseconds(5100));  // (1 + 50) / 10 per s
  clock.now += milliseconds(5100);
  EXPECT_TRUE(limiter.Admit(0).admitted);
}

TEST(RateLimiter, ARequestRefusedForTokensDoesNotUseUpARequest) {
  FakeClock clock;
  RateLimits limits;
  limits.requests_per_second = 1;
  limits.tokens_per_minute = 60;
  RateLimiter limiter(1, limits, clock.fn());
  limiter.ChargeTokens(0, 61);  // 1 in debt: next token in 2 s
  EXPECT_FALSE(limiter.Admit(0).admitted);
  clock.now += seconds(2);
  EXPECT_TRUE(limiter.Admit(0).admitted);  // the request bucket is still full
}

TEST(RateLimiter, NoLimitsAdmitEverything) {
  FakeClock clock;
  RateLimiter limiter(1, RateLimits(), clock.fn());
  for (int i = 0; i < 1000; ++i) ASSERT_TRUE(limiter.Admit(0).admitted);
  limiter.ChargeTokens(0, 1 << 30);
  EXPECT_TRUE(limiter.Admit(0).admitted);
}

}  // namespace
}  // namespace dsmoe
