// GatewayServer inside the test process: created from options (no flags, no global state), its
// bound port readable, two at once, and the answers a gateway gives when no attention server
// is reachable, each with the right gRPC code and a message naming the problem.
#include "gateway/gateway_server.h"

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace dsmoe
