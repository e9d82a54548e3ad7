// The expert servers' client pool (expert-server/client/): grpc::Status -> absl::Status with the
// server and the call named, which failures count as transport failures, and the health
// transitions a server goes through: resting after a failure without health checks (injected
// clock), and with health checks against a real gRPC server on 127.0.0.1 (down before the
// first check, serving after it, kept out by `verify`, out again after MarkDown), each change
// logged as one line into the pool's injected Logger.
#include <errno.h>  // program_invocation_short_name
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_join.h"
#include "core/rpc/grpc_status.h"
#include "core/rpc/server.h"
#include "core/util/log.h"
#include "expert-server/client/expert_server_pool.h"

namespace dsmoe {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

ExpertServerPoolOptions Insecure() {
  ExpertServerPoolOptions o;
  o.security = rpc::TransportSecurity::Insecure();
  return o;
}

TEST(GrpcStatus, ConversionKeepsTheCodeAndNamesTheContext) {
  EXPECT_TRUE(rpc::FromGrpc(grpc::Status::OK, "anything").ok());
  const absl::Status s =
      rpc::FromGrpc(grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "not held"), "call X");
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.message(), "call X: not held");
  // Every canonical code survives the round trip (gRPC's numbering, 0..16).
  for (int code = 1; code <= 16; ++code) {
    const grpc::Status g(static_cast<grpc::StatusCode>(code), "m");
    EXPECT_EQ(static_cast<int>(rpc::FromGrpc(g).code()), code);
    EXPECT_EQ(static_cast<int>(rpc::ToGrpc(rpc::FromGrpc(g)).error_code()), code);
  }
}

TEST(GrpcStatus, OnlyUnreachableOrLateCallsAreTransportFailures) {
  for (int code = 0; code <= 16; ++code) {
    const bool transport = code == 14 /* UNAVAILABLE */ || code == 4 /* DEADLINE_EXCEEDED */;
    EXPECT_EQ(rpc::IsTransportFailure(grpc::Status(static_cast<grpc::StatusCode>(code), "m")),
              transport)
        << "code " << code;
  }
}

TEST(ExpertServerPool, CallStatusNamesTheServerAndTheCall) {
  ExpertServerPool pool({"10.0.0.1:5000", "10.0.0.2:5001"}, Insecure());
  EXPECT_EQ(pool.num_servers(), 2);
  EXPECT_EQ(pool.Name(1), "expert server 1 at 10.0.0.2:5001");
  EXPECT_TRUE(pool.CallStatus(1, "GetExperts", grpc::Status::OK).ok());
  const absl::Status s =
      pool.CallStatus(1, "GetExperts", grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "full"));
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(s.message(), "expert server 1 at 10.0.0.2:5001: GetExperts: full");
}

TEST(ExpertServerPool, ACallToADeadServerIsUnavailableAndNamed) {
  // Port 1 on the loopback: nothing listens, the connection is refused at once.
  ExpertServerPool pool({"127.0.0.1:1"}, Insecure());
  const auto got = pool.GetExperts(0, milliseconds(2000));
  ASSERT_FALSE(got.ok());
  EXPECT_EQ(got.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(got.status().message().find("expert server 0 at 127.0.0.1:1: GetExperts: "),
            std::string::npos)
      << got.status();
}

TEST(ExpertServerPool, WithoutHealthChecksAFailedServerRestsThenRejoins) {
  Clock::time_point now{};  // the injected clock
  ExpertServerPoolOptions o = Insecure();
  o.retry_down_after = milliseconds(2000);
  o.now = [&now] { return now; };
  ExpertServerPool pool({"127.0.0.1:1", "127.0.0.1:2"}, o);
  EXPECT_TRUE(pool.available(0));
  EXPECT_TRUE(pool.available(1));
  EXPECT_EQ(pool.health_checker(), nullptr);

  pool.MarkDown(0, "a dispatch call failed");
  EXPECT_FALSE(pool.available(0));
  EXPECT_TRUE(pool.available(1)) << "only the failed server rests";
  now += milliseconds(1999);
  EXPECT_FALSE(pool.available(0));
  now += milliseconds(1);
  EXPECT_TRUE(pool.available(0)) << "after retry_down_after it gets work again";
  EXPECT_TRUE(pool.available(0));

  // Failing again starts a new rest from that moment.
  pool.MarkDown(0, "again");
  now += milliseconds(1000);
  EXPECT_FALSE(pool.available(0));
  now += milliseconds(1000);
  EXPECT_TRUE(pool.available(0));
}

TEST(ExpertServerPool, WithHealthChecksAServerServesOnlyOnceCheckedAndVerified) {
  // A real server on an ephemeral port, serving grpc.health.v1 ("" SERVING) and nothing else.
  rpc::ServerOptions so;
  so.security = rpc::TransportSecurity::Insecure();
  auto server = rpc::StartServer(so, {});
  ASSERT_TRUE(server.ok()) << server.status();

  ExpertServerPoolOptions o = Insecure();
  rpc::HealthCheckOptions checks;
  checks.period = milliseconds(50);
  checks.timeout = milliseconds(1000);
  checks.failure_threshold = 1;
  o.health_checks = checks;
  // Server 1 is a dead address: it stays down whatever the other does.
  ExpertServerPool pool({server->address(), "127.0.0.1:1"}, o);
  ASSERT_NE(pool.health_checker(), nullptr);
  EXPECT_FALSE(pool.available(0)) << "down until its first check";

  std::atomic<bool> holds_its_experts{false};
  std::atomic<int> changes{0};
  pool.StartHealthChecks(
      [&](int) {
        return holds_its_experts ? absl::OkStatus()
                                 : absl::FailedPreconditionError("does not hold expert (1, 2)");
      },
      [&](int, rpc::TargetHealth) { ++changes; });
  // The first round ran inside StartHealthChecks: serving, but refused by verify.
  EXPECT_FALSE(pool.available(0));
  EXPECT_EQ(pool.health_checker()->Reason(0), "does not hold expert (1, 2)");
  EXPECT_FALSE(pool.available(1));

  holds_its_experts = true;
  const auto deadline = Clock::now() + std::chrono::seconds(10);
  while (!pool.available(0) && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_TRUE(pool.available(0)) << "a verified, serving server rejoins by itself";
  EXPECT_FALSE(pool.available(1));

  const int before = changes.load();
  holds_its_experts = false;  // so that no check brings it back before we look
  pool.MarkDown(0, "a dispatch call failed: gone");
  EXPECT_FALSE(pool.available(0)) << "MarkDown takes it out at once";
  // It still answers its checks, so once verified it comes back within a period or two.
  holds_its_experts = true;
  while (!pool.available(0) && Clock::now() < deadline) {
    std::this_thread::sleep_for(milliseconds(10));
  }
  EXPECT_TRUE(pool.available(0));
  EXPECT_GE(changes.load(), before + 2) << "down, then serving again, both reported";
  server->server->Shutdown();
}

TEST(ExpertServerPool, HealthChangesAreLoggedToTheInjectedLogger) {
  // Declared first: the server and the pool log into them until they are destroyed.
  CapturingLogger server_log, pool_log, replaced;
  rpc::ServerOptions so;
  so.security = rpc::TransportSecurity::Insecure();
  so.logger = &server_log;
  auto server = rpc::StartServer(so, {});
  ASSERT_TRUE(server.ok()) << server.status();
  // The plain-text warning went to the server's logger, as the one line it always was.
  ASSERT_EQ(server_log.entries().size(), 1u);
  EXPECT_EQ(server_log.entries()[0].level, LogLevel::kWarning);
  EXPECT_EQ(server_log.lines()[0],
            std::string(program_invocation_short_name) +
                ": WARNING: serving PLAINTEXT gRPC on 127.0.0.1:0 (--insecure): no encryption, "
                "no client authentication; anyone who reaches the port can call every method");

  ExpertServerPoolOptions o = Insecure();
  rpc::HealthCheckOptions checks;
  checks.period = std::chrono::seconds(60);  // only the first round and MarkDown change states
  checks.timeout = milliseconds(1000);
  checks.failure_threshold = 1;
  checks.log_prefix = "dsmoe-test";
  checks.target_kind = "expert server";
  checks.logger = &replaced;  // the pool's own logger replaces it
  o.health_checks = checks;
  o.logger = &pool_log;
  const std::string live = server->address(), dead = "127.0.0.1:1";
  ExpertServerPool pool({live, dead}, o);
  EXPECT_TRUE(pool_log.lines().empty()) << "nothing happened before the checks start";
  pool.StartHealthChecks(nullptr, nullptr);
  ASSERT_TRUE(pool.available(0));
  ASSERT_FALSE(pool.available(1));
  pool.MarkDown(0, "a dispatch call failed: gone");

  // "<log_prefix>: <target_kind> <i> at <address> is <health>[: <reason>]", one line each.
  const std::vector<std::string> lines = pool_log.lines();
  // (MarkDown also wakes the checker, which may find server 0 serving again: a fourth line.)
  ASSERT_GE(lines.size(), 3u) << absl::StrJoin(lines, "\n");
  ASSERT_LE(lines.size(), 4u) << absl::StrJoin(lines, "\n");
  EXPECT_EQ(lines[0], "dsmoe-test: expert server 0 at " + live + " is serving");
  const std::string down =
      "dsmoe-test: expert server 1 at " + dead + " is down: health check failed: ";
  EXPECT_EQ(lines[1].substr(0, down.size()), down) << lines[1];
  EXPECT_GT(lines[1].size(), down.size()) << "the failed check says why";
  EXPECT_EQ(lines[2],
            "dsmoe-test: expert server 0 at " + live + " is down: a dispatch call failed: gone");
  if (lines.size() == 4) {
    EXPECT_EQ(lines[3], lines[0]);
  }
  for (const CapturingLogger::Entry& e : pool_log.entries()) EXPECT_EQ(e.level, LogLevel::kInfo);
  EXPECT_TRUE(replaced.lines().empty());
  pool.StopHealthChecks();
  server->server->Shutdown();
}

TEST(HealthChecker, ATargetThatStaysDownIsLoggedAgainNowAndThen) {
  // A dead address checked every 10 ms: the change is logged at once, then the reason again
  // every repeat_log_period (100 ms) — not at every failed check, and not only once.
  CapturingLogger log;
  rpc::HealthCheckOptions o;
  o.period = milliseconds(10);
  o.timeout = milliseconds(200);
  o.failure_threshold = 1;
  o.repeat_log_period = milliseconds(100);
  o.log_prefix = "t";
  o.target_kind = "server";
  o.logger = &log;
  const auto start = Clock::now();
  rpc::HealthChecker checker({"127.0.0.1:1"}, rpc::TransportSecurity::Insecure(), o);
  checker.Start(nullptr);
  std::this_thread::sleep_for(milliseconds(550));
  checker.Stop();
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  const std::vector<std::string> lines = log.lines();
  for (const std::string& l : lines) {
    EXPECT_EQ(l.rfind("t: server 0 at 127.0.0.1:1 is down: health check failed: ", 0), 0u) << l;
  }
  // Once at the start, then at most once per 100 ms of the run (5-6 here), and at least twice
  // more in 550 ms even on a slow machine — where there were ~50 failed checks.
  EXPECT_GE(lines.size(), 3u) << absl::StrJoin(lines, "\n");
  EXPECT_LE(static_cast<double>(lines.size()), 2 + seconds / 0.1) << absl::StrJoin(lines, "\n");
}

}  // namespace
}  // namespace dsmoe
