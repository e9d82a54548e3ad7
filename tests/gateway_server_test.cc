// GatewayServer inside the test process: created from options (no flags, no global state), its
// bound port readable, two at once, and the answers a gateway gives when no attention server
// is reachable, each with the right gRPC code and a message naming the problem; what it logs goes
// to the Logger its options inject.
#include "gateway/gateway_server.h"

#include <errno.h>  // program_invocation_short_name
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "core/util/log.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

GatewayServerOptions Options(const std::string& model_dir) {
  GatewayServerOptions o;
  o.model_dir = model_dir;
  o.attention_servers = {"127.0.0.1:1"};  // nothing listens on port 1: refused at once
  o.server.security = rpc::TransportSecurity::Insecure();
  o.gateway.upstream_security = rpc::TransportSecurity::Insecure();
  o.no_auth = true;
  o.health.period = std::chrono::milliseconds(50);
  o.health.timeout = std::chrono::milliseconds(200);
  return o;
}

std::unique_ptr<v1::Gateway::Stub> Connect(const GatewayServer& server) {
  return v1::Gateway::NewStub(
      grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials()));
}

grpc::Status Generate(v1::Gateway::Stub& stub, std::vector<uint32_t> ids) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::GenerateRequest request;
  request.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  request.set_max_tokens(4);
  auto reader = stub.Generate(&ctx, request);
  v1::GenerateResponse response;
  while (reader->Read(&response)) {
  }
  return reader->Finish();
}

TEST(GatewayServer, RefusesOptionsWithoutAWayToAuthenticate) {
  testing::TempDir dir;
  testing::WriteTinyModel(dir.path());
  GatewayServerOptions o = Options(dir.path());
  o.no_auth = false;
  auto server = GatewayServer::Create(o);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(server.status().message().find("--api-keys"), std::string::npos);
}

TEST(GatewayServer, RunsInProcessAndNamesTheUnreachableAttentionServer) {
  testing::TempDir dir;
  const ModelConfig config = testing::WriteTinyModel(dir.path());
  auto a = GatewayServer::Create(Options(dir.path()));
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = GatewayServer::Create(Options(dir.path()));  // a second one: nothing is global
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_GT((*a)->port(), 0);
  EXPECT_NE((*a)->port(), (*b)->port());

  auto stub = Connect(**a);
  grpc::Status s = Generate(*stub, {1, 2, 3});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
  EXPECT_NE(s.error_message().find("127.0.0.1:1"), std::string::npos) << s.error_message();

  s = Generate(*stub, {static_cast<uint32_t>(config.vocab_size)});
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();

  {
    grpc::ClientContext ctx;
    v1::ModelInfo info;
    s = stub->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &info);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << s.error_message();
    EXPECT_NE(s.error_message().find("127.0.0.1:1"), std::string::npos) << s.error_message();
  }
  {
    grpc::ClientContext ctx;
    v1::TokenizeRequest request;
    request.set_text("hello");
    v1::TokenizeResponse response;
    s = stub->Tokenize(&ctx, request, &response);  // the tiny model has no tokenizer.json
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  }
  (*a)->Shutdown(std::chrono::system_clock::now());
  (*a)->Wait();
}

TEST(GatewayServer, LogsIntoTheInjectedLogger) {
  testing::TempDir dir;
  testing::WriteTinyModel(dir.path());
  // Declared before the server: it logs into them until it is destroyed.
  CapturingLogger log, replaced;
  GatewayServerOptions o = Options(dir.path());
  o.health.log_prefix = "dsmoe-gateway";  // as the main names them
  o.health.target_kind = "attention server";
  o.health.period = std::chrono::seconds(60);  // only the first round, before Create returns
  o.health.logger = &replaced;                 // Create replaces both with o.logger
  o.server.logger = &replaced;
  o.logger = &log;
  auto server = GatewayServer::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();

  // Start-up, in order: plain text warned about, not ready (the first round's verdict), then
  // the attention server named as down, with why.
  const std::vector<CapturingLogger::Entry> entries = log.entries();
  std::vector<std::string> lines;
  for (const CapturingLogger::Entry& e : entries) lines.push_back(e.message);
  ASSERT_EQ(entries.size(), 3u) << absl::StrJoin(lines, "\n");
  EXPECT_EQ(entries[0].level, LogLevel::kWarning);
  EXPECT_EQ(lines[0], std::string(program_invocation_short_name) +
                          ": WARNING: serving PLAINTEXT gRPC on 127.0.0.1:0 (--insecure): no "
                          "encryption, no client authentication; anyone who reaches the port can "
                          "call every method");
  const std::string down = "dsmoe-gateway: attention server 0 at 127.0.0.1:1 is down: ";
  EXPECT_EQ(lines[1], "dsmoe-gateway: not ready: no attention server is ready");
  EXPECT_EQ(lines[2].substr(0, down.size()), down) << lines[2];
  EXPECT_GT(lines[2].size(), down.size()) << "the failed check says why";
  EXPECT_EQ(entries[1].level, LogLevel::kInfo);
  EXPECT_EQ(entries[2].level, LogLevel::kInfo);
  EXPECT_TRUE(replaced.entries().empty()) << absl::StrJoin(replaced.lines(), "\n");
}

}  // namespace
}  // namespace dsmoe
