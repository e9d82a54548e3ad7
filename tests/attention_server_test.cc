// AttentionServer as a class, beside two ExpertServers in one process on ephemeral 127.0.0.1
// ports: it becomes ready once its health checks find every routed expert, its logits through
// the expert servers equal those of an attention server that computes the routed experts itself
// (the model code itself is checked against the PyTorch reference elsewhere), it notices an
// expert server going away (not ready; the experts only that server held fail, named), its
// options are validated in Create, and Shutdown is idempotent and releases Wait. What the servers
// log goes to the Logger their Options inject (a CapturingLogger here), read back line by line.
#include "attention-server/attention_server.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "absl/strings/str_join.h"
#include "core/rpc/grpc_status.h"
#include "core/rpc/server.h"
#include "core/util/log.h"
#include "dsmoe/internal/v1/attention.grpc.pb.h"
#include "expert-server/expert_server.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using Clock = std::chrono::steady_clock;

bool WaitFor(const std::function<bool()>& done, std::chrono::seconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (!done()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

class AttentionServerTest : public ::testing::Test {
 protected:
  void SetUp() override { testing::WriteTinyModel(dir_.path()); }

  AttentionServerOptions Options(std::vector<std::string> expert_servers) const {
    AttentionServerOptions o;
    o.model_dir = dir_.path();
    o.expert_servers = std::move(expert_servers);
    o.threads = 1;
    o.scheduler.num_slots = 2;
    o.scheduler.max_batch_tokens = 32;
    o.expert_health.period = std::chrono::milliseconds(50);
    o.expert_health.timeout = std::chrono::milliseconds(1000);
    o.expert_health.failure_threshold = 1;
    o.tls.insecure = true;
    o.serving.metrics_listen = "";
    return o;
  }

  std::unique_ptr<ExpertServer> StartExpertServer(int index, int num_replicas = 1,
                                                  Logger* logger = DefaultLogger()) const {
    ExpertServerOptions o;
    o.logger = logger;
    o.model_dir = dir_.path();
    o.num_servers = 2;
    o.num_replicas = num_replicas;
    o.server_index = index;
    o.store.threads = 1;
    o.tls.insecure = true;
    o.serving.metrics_listen = "";
    auto server = ExpertServer::Create(o);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }

  // Logits of every position of `ids` ([T, V]) from the attention server at `address`.
  static absl::StatusOr<std::vector<float>> Logits(const std::string& address,
                                                   const std::vector<uint32_t>& ids) {
    auto stub = internal::v1::AttentionService::NewStub(
        rpc::MakeChannel(address, rpc::TransportSecurity::Insecure()));
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    internal::v1::ComputeLogitsRequest request;
    request.mutable_token_ids()->Assign(ids.begin(), ids.end());
    internal::v1::ComputeLogitsResponse response;
    const grpc::Status s = stub->ComputeLogits(&context, request, &response);
    if (!s.ok()) return rpc::FromGrpc(s, "ComputeLogits");
    std::vector<float> out(response.logits().size() / sizeof(float));
    std::memcpy(out.data(), response.logits().data(), response.logits().size());
    return out;
  }

  testing::TempDir dir_;
};

TEST_F(AttentionServerTest, WithTwoExpertServersInOneProcess) {
  std::unique_ptr<ExpertServer> experts[2] = {StartExpertServer(0), StartExpertServer(1)};
  ASSERT_TRUE(experts[0] != nullptr && experts[1] != nullptr);
  auto remote = AttentionServer::Create(Options({experts[0]->address(), experts[1]->address()}));
  ASSERT_TRUE(remote.ok()) << remote.status();
  auto local = AttentionServer::Create(Options({}));
  ASSERT_TRUE(local.ok()) << local.status();
  EXPECT_TRUE((*local)->ready()) << "local experts: ready at once";
  ASSERT_TRUE(WaitFor([&] { return (*remote)->ready(); }, std::chrono::seconds(20)))
      << "the health checks never found every routed expert";

  const std::vector<uint32_t> ids = {1, 17, 4, 33, 2, 9, 41, 5};
  auto got = Logits((*remote)->address(), ids);
  auto want = Logits((*local)->address(), ids);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(got->size(), want->size());
  ASSERT_FALSE(got->empty());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got->size(); ++i) {
    diff += std::pow((*got)[i] - (*want)[i], 2);
    norm += std::pow((*want)[i], 2);
  }
  EXPECT_LT(std::sqrt(diff / norm), 1e-5) << "dispatch + combine across two servers";

  // Expert server 1 goes away: the checks take it out, and with one copy of each expert the
  // attention server is no longer ready; a request needing its experts fails, naming them.
  experts[1]->Shutdown();
  EXPECT_TRUE(WaitFor([&] { return !(*remote)->ready(); }, std::chrono::seconds(20)));
  auto failed = Logits((*remote)->address(), ids);
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.status().message().find("routed expert"), std::string::npos) << failed.status();

  // Shutdown twice, with a waiter: all return; the port is closed.
  std::thread waiter([&] { (*remote)->Wait(); });
  (*remote)->Shutdown();
  waiter.join();
  (*remote)->Shutdown();
  EXPECT_EQ(Logits((*remote)->address(), ids).status().code(), absl::StatusCode::kUnavailable);
}

// Once the health checks have found the expert servers' data ports, every dispatch goes over
// the data plane (framed, on connections held open), not gRPC: the calls counted by transport
// agree, and the logits are those of local experts (checked above).
TEST_F(AttentionServerTest, DispatchGoesOverTheDataPlane) {
  std::unique_ptr<ExpertServer> experts[2] = {StartExpertServer(0), StartExpertServer(1)};
  ASSERT_TRUE(experts[0] != nullptr && experts[1] != nullptr);
  ASSERT_GT(experts[0]->data_port(), 0);
  auto remote = AttentionServer::Create(Options({experts[0]->address(), experts[1]->address()}));
  ASSERT_TRUE(remote.ok()) << remote.status();
  ASSERT_TRUE(WaitFor([&] { return (*remote)->ready(); }, std::chrono::seconds(20)));
  ASSERT_TRUE(Logits((*remote)->address(), {1, 17, 4, 33, 2, 9}).ok());
  const std::string text = (*remote)->metrics().Text();
  auto sum = [&](const std::string& name) {
    double total = 0;
    for (size_t at = text.find("\n" + name + "{"); at != std::string::npos;
         at = text.find("\n" + name + "{", at + 1)) {
      const size_t end = text.find('\n', at + 1);
      const std::string line = text.substr(at + 1, end - at - 1);
      if (line.find("code=\"OK\"") != std::string::npos ||
          name.find("data_plane") != std::string::npos)
        total += std::stod(line.substr(line.rfind(' ') + 1));
    }
    return total;
  };
  const double calls = sum("dsmoe_dispatch_calls_total");
  EXPECT_GT(calls, 0);
  EXPECT_EQ(sum("dsmoe_dispatch_data_plane_calls_total"), calls);
}

TEST_F(AttentionServerTest, AReplicaTakesOverFromAServerThatWentAway) {
  // Declared first: the servers log into them until they are destroyed.
  CapturingLogger attention_log, expert_log;
  // Two copies of every expert, one on each server.
  std::unique_ptr<ExpertServer> experts[2] = {StartExpertServer(0, 2, &expert_log),
                                              StartExpertServer(1, 2, &expert_log)};
  ASSERT_TRUE(experts[0] != nullptr && experts[1] != nullptr);
  AttentionServerOptions o = Options({experts[0]->address(), experts[1]->address()});
  o.logger = &attention_log;
  o.num_replicas = 2;
  o.expert_health.period = std::chrono::seconds(60);  // only a failed call takes it out here
  auto remote = AttentionServer::Create(o);
  ASSERT_TRUE(remote.ok()) << remote.status();
  auto local = AttentionServer::Create(Options({}));
  ASSERT_TRUE(local.ok()) << local.status();
  ASSERT_TRUE((*remote)->ready());

  // Gone without the health checks noticing: the dispatch call to it fails in transport, the
  // pool marks it down and the layer goes again to the replicas, with the same result.
  experts[1]->Shutdown();
  const std::vector<uint32_t> ids = {3, 1, 4, 1, 5, 9, 2, 6};
  auto got = Logits((*remote)->address(), ids);
  auto want = Logits((*local)->address(), ids);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(got->size(), want->size());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < got->size(); ++i) {
    diff += std::pow((*got)[i] - (*want)[i], 2);
    norm += std::pow((*want)[i], 2);
  }
  EXPECT_LT(std::sqrt(diff / norm), 1e-5);
  EXPECT_TRUE((*remote)->ready()) << "every routed expert still has a serving holder";

  // What the attention server said, in the words its log has always used: both expert servers
  // found serving, ready, then server 1 taken out by the failed dispatch call.
  const std::vector<std::string> lines = attention_log.lines();
  auto has_line = [&](const std::string& line) {
    return std::find(lines.begin(), lines.end(), line) != lines.end();
  };
  auto has_prefix = [&](const std::string& prefix) {
    return std::any_of(lines.begin(), lines.end(),
                       [&](const std::string& l) { return l.rfind(prefix, 0) == 0; });
  };
  const std::string name = "dsmoe-attention-server: expert server ";
  EXPECT_TRUE(has_line(name + "0 at " + experts[0]->address() + " is serving"));
  EXPECT_TRUE(has_line(name + "1 at " + experts[1]->address() + " is serving"));
  EXPECT_TRUE(has_line("dsmoe-attention-server: ready"));
  EXPECT_TRUE(
      has_prefix(name + "1 at " + experts[1]->address() + " is down: a dispatch call failed: "))
      << absl::StrJoin(lines, "\n");
  EXPECT_FALSE(has_prefix(name + "0 at " + experts[0]->address() + " is down"))
      << "only the server that went away";
  // Plain text (tls.insecure) is warned about, once per server, into each server's own logger.
  const std::string plaintext = ": WARNING: serving PLAINTEXT gRPC on 127.0.0.1:0 (--insecure)";
  auto count = [&](const CapturingLogger& log, const std::string& needle) {
    int n = 0;
    for (const CapturingLogger::Entry& e : log.entries()) {
      if (e.message.find(needle) != std::string::npos) {
        EXPECT_EQ(e.level, LogLevel::kWarning) << e.message;
        ++n;
      }
    }
    return n;
  };
  EXPECT_EQ(count(attention_log, plaintext), 1);
  EXPECT_EQ(count(expert_log, plaintext), 2);
}

TEST_F(AttentionServerTest, CreateValidatesItsOptions) {
  AttentionServerOptions o = Options({});
  o.model_dir = "";
  EXPECT_EQ(AttentionServer::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options({});
  o.expert_transport = AttentionServerOptions::ExpertTransport::kNccl;
  EXPECT_EQ(AttentionServer::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options({});
  o.scheduler.num_slots = 0;
  EXPECT_EQ(AttentionServer::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options({"127.0.0.1:1", "127.0.0.1:2"});
  o.dispatch_deadline = std::chrono::milliseconds(0);
  EXPECT_EQ(AttentionServer::Create(o).status().code(), absl::StatusCode::kInvalidArgument);
}

// The memory plan is checked before the KV cache is allocated: over the limit, Create fails
// naming the plan's parts and the limit; within it, the server starts and exports the plan.
TEST_F(AttentionServerTest, RefusesToStartWhenTheMemoryPlanExceedsTheLimit) {
  AttentionServerOptions o = Options({});
  o.memory_limit = 100 << 20;  // less than the runtime allowance alone
  const auto refused = AttentionServer::Create(o);
  ASSERT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  for (const char* part : {"weights", "KV cache", "activations", "100.0 MiB (--memory-limit)"}) {
    EXPECT_THAT(std::string(refused.status().message()), ::testing::HasSubstr(part));
  }
  o = Options({});
  o.memory_limit = int64_t{4} << 30;
  auto server = AttentionServer::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();
}

// The KV dtype: auto is f32 for this F32 checkpoint; bf16 on request, and the plan in the
// refusal names it; f32 is refused for the GPU runner (its cache is bf16) before loading.
TEST_F(AttentionServerTest, ResolvesAndDescribesItsKvDtype) {
  auto server = AttentionServer::Create(Options({}));
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_THAT((*server)->Describe(), ::testing::HasSubstr("f32 KV cache"));
  (*server)->Shutdown();
  AttentionServerOptions o = Options({});
  o.scheduler.kv_dtype = KvDType::kBF16;
  auto bf16 = AttentionServer::Create(o);
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_THAT((*bf16)->Describe(), ::testing::HasSubstr("bf16 KV cache"));
  (*bf16)->Shutdown();
  o.memory_limit = 100 << 20;
  EXPECT_THAT(std::string(AttentionServer::Create(o).status().message()),
              ::testing::HasSubstr(" each, bf16)"));
  o = Options({});
  o.device = *ParseDevice("cuda");
  o.scheduler.kv_dtype = KvDType::kF32;
  const auto refused = AttentionServer::Create(o);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(refused.status().message()), ::testing::HasSubstr("bf16"));
}

}  // namespace
}  // namespace dsmoe
