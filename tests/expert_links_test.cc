// The expert data plane end to end: a real ExpertServer in this process and ExpertLinks over
// real 127.0.0.1 sockets (TLS with mutual TLS, with the certificates `dsmoe cluster up` makes,
// and plain text). Outputs are checked against the same request over gRPC ComputeExperts and
// against a naive double-precision reference straight from the checkpoint's expert weights;
// malformed frames are written by hand on a raw socket.
#include "expert-server/client/expert_links.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio.hpp>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <thread>

#include "cli/cluster_certs.h"
#include "core/rpc/server.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"
#include "expert-server/data_plane_frame.h"
#include "expert-server/expert_server.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// Small enough to write in a moment, wide enough that a large call computes for a while.
ModelConfig TestConfig() {
  ModelConfig c = *PresetConfig("tiny");
  c.hidden_size = 256;
  c.moe_intermediate_size = 512;
  c.n_routed_experts = 8;
  c.num_experts_per_tok = 4;
  c.intermediate_size = (c.n_shared_experts + c.num_experts_per_tok) * c.moe_intermediate_size;
  return c;
}

// One call's inputs, owned: x has more rows than are sent, sent in a shuffled order.
struct CallData {
  uint32_t layer = 0;
  std::vector<float> x;  // [T + 3, H]
  std::vector<int32_t> rows, token, expert;
  std::vector<float> weight;

  LinkCall View() const { return LinkCall{layer, x.data(), rows, token, expert, weight}; }
};

CallData MakeCall(const ModelConfig& c, uint32_t layer, int T, uint64_t seed) {
  CallData d;
  d.layer = layer;
  const int64_t H = c.hidden_size;
  d.x = testing::RandomFloats(static_cast<size_t>((T + 3) * H), seed);
  d.rows.resize(T);
  std::iota(d.rows.begin(), d.rows.end(), 3);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::shuffle(d.rows.begin(), d.rows.end(), rng);
  for (int t = 0; t < T; ++t) {
    // k distinct experts per token (as a router picks them).
    std::vector<int32_t> experts(c.n_routed_experts);
    std::iota(experts.begin(), experts.end(), 0);
    std::shuffle(experts.begin(), experts.end(), rng);
    for (int64_t j = 0; j < c.num_experts_per_tok; ++j) {
      d.token.push_back(t);
      d.expert.push_back(experts[j]);
      d.weight.push_back(std::uniform_real_distribution<float>(0.05f, 0.5f)(rng));
    }
  }
  return d;
}

// Σ weight · expert(x[row]) per sent row, from the weights, in double precision.
std::vector<double> Reference(const ModelWeights& w, const CallData& d) {
  const int64_t H = w.config().hidden_size;
  std::vector<double> out(d.rows.size() * H, 0.0);
  for (size_t i = 0; i < d.token.size(); ++i) {
    const int32_t t = d.token[i];
    const std::vector<double> y = testing::NaiveExpert(
        w.layers[d.layer].routed[d.expert[i]], d.x.data() + static_cast<size_t>(d.rows[t]) * H);
    for (int64_t h = 0; h < H; ++h) out[t * H + h] += d.weight[i] * y[h];
  }
  return out;
}

// The same call over gRPC ComputeExperts.
absl::StatusOr<std::vector<float>> OverGrpc(const std::string& address,
                                            const rpc::TransportSecurity& security,
                                            const CallData& d, int64_t H) {
  auto stub = internal::v1::ExpertService::NewStub(rpc::MakeChannel(address, security));
  internal::v1::ComputeExpertsRequest req;
  req.set_layer(d.layer);
  req.set_num_tokens(static_cast<uint32_t>(d.rows.size()));
  std::string* hidden = req.mutable_hidden();
  for (int32_t r : d.rows) {
    hidden->append(reinterpret_cast<const char*>(d.x.data() + r * H), H * sizeof(float));
  }
  for (size_t i = 0; i < d.token.size(); ++i) {
    req.add_token(static_cast<uint32_t>(d.token[i]));
    req.add_expert(static_cast<uint32_t>(d.expert[i]));
    req.add_weight(d.weight[i]);
  }
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  internal::v1::ComputeExpertsResponse resp;
  const grpc::Status s = stub->ComputeExperts(&ctx, req, &resp);
  if (!s.ok())
    return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
  std::vector<float> out(resp.output().size() / sizeof(float));
  std::memcpy(out.data(), resp.output().data(), resp.output().size());
  return out;
}

class ExpertLinksTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new testing::TempDir();
    config_ = TestConfig();
    ASSERT_TRUE(WriteRandomCheckpoint(config_, {DType::kBF16, 7, 1}, dir_->path()).ok());
    auto w = ModelWeights::Load(dir_->path());
    ASSERT_TRUE(w.ok()) << w.status();
    weights_ = w->release();
    auto creds = cli::MakeClusterCredentials(dir_->File("certs"));
    ASSERT_TRUE(creds.ok()) << creds.status();
    creds_ = new cli::ClusterCredentials(*creds);
  }
  static void TearDownTestSuite() {
    delete weights_;
    delete creds_;
    delete dir_;
  }

  // One server holding every expert; mutual TLS unless `insecure`.
  std::unique_ptr<ExpertServer> StartServer(bool insecure, int64_t max_tokens = 4096) {
    ExpertServerOptions o;
    o.model_dir = dir_->path();
    o.store.threads = 1;
    o.store.max_tokens = max_tokens;
    o.serving.metrics_listen = "";
    if (insecure) {
      o.tls.insecure = true;
    } else {
      o.tls.cert_file = creds_->server_cert;
      o.tls.key_file = creds_->server_key;
      o.tls.ca_file = creds_->ca;
      o.tls.require_client_cert = true;
    }
    auto server = ExpertServer::Create(o);
    EXPECT_TRUE(server.ok()) << server.status();
    return server.ok() ? std::move(*server) : nullptr;
  }

  static rpc::TransportSecurity ClientSecurity(bool insecure, bool with_certificate = true) {
    if (insecure) return rpc::TransportSecurity::Insecure();
    rpc::TransportSecurityOptions o;
    o.ca_file = creds_->ca;
    if (with_certificate) {
      o.cert_file = creds_->client_cert;
      o.key_file = creds_->client_key;
    }
    return *rpc::TransportSecurity::Load(o);
  }

  // One call through `links` to server 0; the result.
  static const ExpertLinks::Result& Call(ExpertLinks& links, const CallData& d,
                                         milliseconds timeout = milliseconds(30000)) {
    const auto deadline = Clock::now() + timeout;
    const absl::Status started = links.Start(0, d.View(), deadline);
    EXPECT_TRUE(started.ok()) << started;
    links.WaitAll(deadline);
    return links.result(0);
  }

  void ExpectMatchesGrpcAndReference(bool insecure) {
    auto server = StartServer(insecure);
    ASSERT_NE(server, nullptr);
    ASSERT_GT(server->data_port(), 0);
    const rpc::TransportSecurity security = ClientSecurity(insecure);
    ExpertLinks links(1, security, config_.hidden_size);
    EXPECT_FALSE(links.HasEndpoint(0));
    links.SetEndpoint(0, "127.0.0.1", server->data_port());
    EXPECT_TRUE(links.HasEndpoint(0));
    const int64_t H = config_.hidden_size;
    uint64_t seed = 1;
    for (int T : {1, 2, 7, 8, 32}) {
      for (uint32_t layer = 1; layer < config_.num_hidden_layers; layer += 2) {
        const CallData d = MakeCall(config_, layer, T, seed++);
        const ExpertLinks::Result& r = Call(links, d);
        ASSERT_TRUE(r.status.ok()) << r.status;
        EXPECT_EQ(r.sent_bytes,
                  sizeof(data_plane::RequestHeader) + T * H * 4 + d.token.size() * 12);
        EXPECT_EQ(r.received_bytes, sizeof(data_plane::ReplyHeader) + T * H * 4);
        EXPECT_GT(r.compute_seconds, 0.0);
        const auto grpc = OverGrpc(server->address(), security, d, H);
        ASSERT_TRUE(grpc.ok()) << grpc.status();
        ASSERT_EQ(grpc->size(), static_cast<size_t>(T * H));
        const std::vector<double> want = Reference(*weights_, d);
        for (int64_t i = 0; i < T * H; ++i) {
          ASSERT_EQ(r.output[i], (*grpc)[i]) << "T " << T << " layer " << layer << " at " << i;
          ASSERT_NEAR(r.output[i], want[i], 2e-3 + 2e-3 * std::abs(want[i]))
              << "T " << T << " layer " << layer << " at " << i;
        }
      }
    }
  }

  static testing::TempDir* dir_;
  static ModelConfig config_;
  static ModelWeights* weights_;
  static cli::ClusterCredentials* creds_;
};

testing::TempDir* ExpertLinksTest::dir_ = nullptr;
ModelConfig ExpertLinksTest::config_;
ModelWeights* ExpertLinksTest::weights_ = nullptr;
cli::ClusterCredentials* ExpertLinksTest::creds_ = nullptr;

TEST_F(ExpertLinksTest, MutualTlsMatchesGrpcAndTheReference) {
  ExpectMatchesGrpcAndReference(/*insecure=*/false);
}

TEST_F(ExpertLinksTest, PlainTextMatchesGrpcAndTheReference) {
  ExpectMatchesGrpcAndReference(/*insecure=*/true);
}

TEST_F(ExpertLinksTest, GetExpertsReportsTheDataPort) {
  auto server = StartServer(/*insecure=*/true);
  ASSERT_NE(server, nullptr);
  auto stub = internal::v1::ExpertService::NewStub(
      rpc::MakeChannel(server->address(), rpc::TransportSecurity::Insecure()));
  grpc::ClientContext ctx;
  internal::v1::GetExpertsResponse resp;
  ASSERT_TRUE(stub->GetExperts(&ctx, {}, &resp).ok());
  EXPECT_EQ(resp.data_port(), static_cast<uint32_t>(server->data_port()));
  EXPECT_NE(server->Describe().find("data plane on port " + std::to_string(server->data_port())),
            std::string::npos)
      << server->Describe();
}

TEST_F(ExpertLinksTest, WithoutEndpointACallDoesNotStart) {
  ExpertLinks links(2, rpc::TransportSecurity::Insecure(), config_.hidden_size);
  const CallData d = MakeCall(config_, 1, 2, 5);
  const absl::Status s = links.Start(1, d.View(), Clock::now() + milliseconds(1000));
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  links.SetEndpoint(1, "127.0.0.1", 0);
  EXPECT_FALSE(links.HasEndpoint(1));
}

// A data port nothing listens on costs one connect attempt, not one per call: the next Start
// is refused at once, saying so (its calls go by gRPC), until the endpoint changes.
TEST_F(ExpertLinksTest, AnUnreachableDataPortIsNotRetriedOnEveryCall) {
  int closed_port = 0;
  {
    boost::asio::io_context io;
    boost::asio::ip::tcp::acceptor probe(
        io, {boost::asio::ip::make_address("127.0.0.1"), 0});  // bound, then closed: refuses
    closed_port = probe.local_endpoint().port();
  }
  ExpertLinks links(1, rpc::TransportSecurity::Insecure(), config_.hidden_size);
  links.SetEndpoint(0, "127.0.0.1", closed_port);
  const CallData d = MakeCall(config_, 1, 2, 5);
  const absl::Status first = links.Start(0, d.View(), Clock::now() + milliseconds(2000));
  EXPECT_EQ(first.code(), absl::StatusCode::kUnavailable) << first;
  const absl::Status second = links.Start(0, d.View(), Clock::now() + milliseconds(2000));
  EXPECT_EQ(second.code(), absl::StatusCode::kUnavailable) << second;
  EXPECT_NE(second.message().find("no new attempt"), std::string::npos) << second;
  // Pointed at a serving data port, it connects at once and computes.
  auto server = StartServer(/*insecure=*/true);
  ASSERT_NE(server, nullptr);
  links.SetEndpoint(0, "127.0.0.1", server->data_port());
  ASSERT_TRUE(links.Start(0, d.View(), Clock::now() + milliseconds(5000)).ok());
  links.WaitAll(Clock::now() + milliseconds(5000));
  EXPECT_TRUE(links.result(0).status.ok()) << links.result(0).status;
}

TEST_F(ExpertLinksTest, MutualTlsRefusesAClientWithoutCertificate) {
  auto server = StartServer(/*insecure=*/false);
  ASSERT_NE(server, nullptr);
  ExpertLinks links(1, ClientSecurity(false, /*with_certificate=*/false), config_.hidden_size);
  links.SetEndpoint(0, "127.0.0.1", server->data_port());
  const CallData d = MakeCall(config_, 1, 2, 5);
  const absl::Status s = links.Start(0, d.View(), Clock::now() + milliseconds(5000));
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("127.0.0.1:" + std::to_string(server->data_port())), std::string::npos)
      << s;
  // A plain-text client is refused as well (no TLS handshake).
  ExpertLinks plain(1, rpc::TransportSecurity::Insecure(), config_.hidden_size);
  plain.SetEndpoint(0, "127.0.0.1", server->data_port());
  EXPECT_FALSE(plain.Start(0, d.View(), Clock::now() + milliseconds(5000)).ok());
  // The server serves on for clients with a certificate.
  ExpertLinks good(1, ClientSecurity(false), config_.hidden_size);
  good.SetEndpoint(0, "127.0.0.1", server->data_port());
  EXPECT_TRUE(Call(good, d).status.ok()) << good.result(0).status;
}

TEST_F(ExpertLinksTest, ServerErrorsKeepTheirCodesAndMessages) {
  auto server = StartServer(/*insecure=*/true);
  ASSERT_NE(server, nullptr);
  ExpertLinks links(1, rpc::TransportSecurity::Insecure(), config_.hidden_size);
  links.SetEndpoint(0, "127.0.0.1", server->data_port());
  CallData d = MakeCall(config_, 1, 3, 9);
  d.token[2] = 3;  // of 3 tokens
  const ExpertLinks::Result& bad_token = Call(links, d);
  EXPECT_EQ(bad_token.status.code(), absl::StatusCode::kInvalidArgument) << bad_token.status;
  EXPECT_EQ(bad_token.status.message(), "assignment 2 names token 3 of 3");
  d = MakeCall(config_, 1, 3, 9);
  d.weight[0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(Call(links, d).status.message(), "weight 0 is not finite");
  d = MakeCall(config_, 0, 3, 9);  // the dense layer
  EXPECT_EQ(Call(links, d).status.message(), "layer 0 is not a MoE layer");
  d = MakeCall(config_, 1, 3, 9);
  d.expert[0] = 8;
  EXPECT_EQ(Call(links, d).status.code(), absl::StatusCode::kInvalidArgument);
  // Value errors leave the connection in step: the next call works on it.
  d = MakeCall(config_, 1, 3, 9);
  const ExpertLinks::Result& ok = Call(links, d);
  ASSERT_TRUE(ok.status.ok()) << ok.status;
  const std::vector<double> want = Reference(*weights_, d);
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_NEAR(ok.output[i], want[i], 2e-3 + 2e-3 * std::abs(want[i]));
}

// A blocking plain-text client speaking the frames by hand.
class RawClient {
 public:
  explicit RawClient(int port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(port));
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    connected_ = ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    timeval tv{10, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  }
  ~RawClient() { ::close(fd_); }
  bool connected() const { return connected_; }
  bool Send(const void* p, size_t n) {
    return ::send(fd_, p, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
  }
  bool Receive(void* p, size_t n) {
    auto* c = static_cast<char*>(p);
    while (n > 0) {
      const ssize_t got = ::recv(fd_, c, n, 0);
      if (got <= 0) return false;
      c += got;
      n -= static_cast<size_t>(got);
    }
    return true;
  }
  // True once the server has closed the connection (EOF).
  bool Closed() {
    char c;
    return ::recv(fd_, &c, 1, 0) == 0;
  }
  // Hello with `hidden`; the reply's status.
  uint32_t Hello(uint32_t hidden, uint32_t magic = data_plane::kHelloMagic) {
    data_plane::HelloHeader h;
    h.magic = magic;
    h.hidden_size = hidden;
    data_plane::HelloReplyHeader r;
    if (!Send(&h, sizeof(h)) || !Receive(&r, sizeof(r))) return 999;
    message_.resize(r.message_bytes);
    if (!Receive(message_.data(), message_.size())) return 998;
    return r.status;
  }
  // An error reply to a request frame: (code, closes) and its message.
  bool ReadReply(data_plane::ReplyHeader* r) {
    if (!Receive(r, sizeof(*r))) return false;
    message_.resize(r->payload_bytes);
    return Receive(message_.data(), message_.size());
  }
  const std::string& message() const { return message_; }

 private:
  int fd_ = -1;
  bool connected_ = false;
  std::string message_;
};

TEST_F(ExpertLinksTest, MalformedFramesGetErrorRepliesAndNeverCrashTheServer) {
  auto server = StartServer(/*insecure=*/true, /*max_tokens=*/64);
  ASSERT_NE(server, nullptr);
  const int port = server->data_port();
  const uint32_t H = static_cast<uint32_t>(config_.hidden_size);
  {
    RawClient c(port);
    ASSERT_TRUE(c.connected());
    EXPECT_EQ(c.Hello(H, 0x12345678), static_cast<uint32_t>(absl::StatusCode::kInvalidArgument));
    EXPECT_NE(c.message().find("bad hello magic"), std::string::npos) << c.message();
    EXPECT_TRUE(c.Closed());
  }
  {
    RawClient c(port);
    EXPECT_EQ(c.Hello(H + 1), static_cast<uint32_t>(absl::StatusCode::kFailedPrecondition));
    EXPECT_NE(c.message().find("hidden size 257"), std::string::npos) << c.message();
  }
  struct Case {
    data_plane::RequestHeader header;
    absl::StatusCode code;
    std::string text;
  };
  data_plane::RequestHeader magic;
  magic.magic = 0xdeadbeef;
  data_plane::RequestHeader tokens;
  tokens.num_tokens = 65;  // max_tokens 64
  tokens.payload_bytes = data_plane::RequestPayloadBytes(65, 0, H);
  data_plane::RequestHeader assignments;
  assignments.num_tokens = 1;
  assignments.num_assignments = 64 * 4 + 1;  // max_tokens × top-k
  assignments.payload_bytes = data_plane::RequestPayloadBytes(1, 64 * 4 + 1, H);
  data_plane::RequestHeader length;
  length.num_tokens = 1;
  length.num_assignments = 1;
  length.payload_bytes = uint64_t{1} << 40;
  for (const Case& k :
       {Case{magic, absl::StatusCode::kInvalidArgument, "bad request magic"},
        Case{tokens, absl::StatusCode::kResourceExhausted, "65 tokens exceed"},
        Case{assignments, absl::StatusCode::kResourceExhausted, "257 assignments exceed"},
        Case{length, absl::StatusCode::kInvalidArgument, "request payload of"}}) {
    RawClient c(port);
    ASSERT_EQ(c.Hello(H), 0u) << c.message();
    ASSERT_TRUE(c.Send(&k.header, sizeof(k.header)));
    data_plane::ReplyHeader r;
    ASSERT_TRUE(c.ReadReply(&r)) << k.text;
    EXPECT_EQ(r.status, static_cast<uint16_t>(k.code)) << k.text << ": " << c.message();
    EXPECT_EQ(r.flags & data_plane::kReplyCloses, data_plane::kReplyCloses) << k.text;
    EXPECT_NE(c.message().find(k.text), std::string::npos) << c.message();
    EXPECT_TRUE(c.Closed()) << k.text;
  }
  {
    // An empty request is a value error: answered, and the connection stays open.
    RawClient c(port);
    ASSERT_EQ(c.Hello(H), 0u);
    data_plane::RequestHeader empty;
    empty.layer = 1;
    for (int i = 0; i < 2; ++i) {
      ASSERT_TRUE(c.Send(&empty, sizeof(empty)));
      data_plane::ReplyHeader r;
      ASSERT_TRUE(c.ReadReply(&r));
      EXPECT_EQ(r.status, static_cast<uint16_t>(absl::StatusCode::kInvalidArgument));
      EXPECT_EQ(r.flags, 0);
      EXPECT_EQ(c.message(), "num_tokens is 0");
    }
  }
  {
    // A frame cut short, then the client leaves: nothing to answer, the server carries on.
    RawClient c(port);
    ASSERT_EQ(c.Hello(H), 0u);
    data_plane::RequestHeader h;
    h.layer = 1;
    h.num_tokens = 2;
    h.num_assignments = 1;
    h.payload_bytes = data_plane::RequestPayloadBytes(2, 1, H);
    ASSERT_TRUE(c.Send(&h, sizeof(h)));
    std::vector<char> half(h.payload_bytes / 2);
    ASSERT_TRUE(c.Send(half.data(), half.size()));
  }
  {
    RawClient c(port);  // garbage instead of a hello
    const std::string junk(100, '\xff');
    c.Send(junk.data(), junk.size());
  }
  // The server still serves.
  ExpertLinks links(1, rpc::TransportSecurity::Insecure(), config_.hidden_size);
  links.SetEndpoint(0, "127.0.0.1", port);
  const CallData d = MakeCall(config_, 1, 4, 11);
  EXPECT_TRUE(Call(links, d).status.ok()) << links.result(0).status;
}

TEST_F(ExpertLinksTest, DeadlineShorterThanTheComputeThenTheNextCallReconnects) {
  auto server = StartServer(/*insecure=*/false);
  ASSERT_NE(server, nullptr);
  ExpertLinks links(1, ClientSecurity(false), config_.hidden_size);
  links.SetEndpoint(0, "127.0.0.1", server->data_port());
  const CallData warm = MakeCall(config_, 1, 1, 3);
  ASSERT_TRUE(Call(links, warm).status.ok()) << links.result(0).status;  // connected
  const CallData big = MakeCall(config_, 1, 1024, 4);
  const auto start = Clock::now();
  const ExpertLinks::Result& late = Call(links, big, milliseconds(5));
  EXPECT_EQ(late.status.code(), absl::StatusCode::kDeadlineExceeded) << late.status;
  EXPECT_LT(Clock::now() - start, milliseconds(1000));
  const CallData next = MakeCall(config_, 3, 5, 5);
  const ExpertLinks::Result& r = Call(links, next);
  ASSERT_TRUE(r.status.ok()) << r.status;
  const std::vector<double> want = Reference(*weights_, next);
  for (size_t i = 0; i < want.size(); ++i)
    ASSERT_NEAR(r.output[i], want[i], 2e-3 + 2e-3 * std::abs(want[i]));
}

TEST_F(ExpertLinksTest, ShutdownWithACallInFlightIsUnavailablePromptly) {
  auto server = StartServer(/*insecure=*/false);
  ASSERT_NE(server, nullptr);
  const rpc::TransportSecurity security = ClientSecurity(false);
  ExpertLinks busy(1, security, config_.hidden_size), caller(1, security, config_.hidden_size);
  busy.SetEndpoint(0, "127.0.0.1", server->data_port());
  caller.SetEndpoint(0, "127.0.0.1", server->data_port());
  const CallData small = MakeCall(config_, 1, 2, 6);
  ASSERT_TRUE(Call(caller, small).status.ok()) << caller.result(0).status;  // connected
  // A long computation occupies the server; the call behind it is in flight when it shuts down.
  // (4096 tokens: some 0.2 s of compute here, against 30 ms for the frame to arrive.)
  const CallData big = MakeCall(config_, 1, 4096, 7);
  const auto deadline = Clock::now() + std::chrono::seconds(30);
  ASSERT_TRUE(busy.Start(0, big.View(), deadline).ok());
  busy.WaitAll(Clock::now() + milliseconds(30));  // sends the rest; the server computes
  ASSERT_TRUE(caller.Start(0, small.View(), deadline).ok());
  std::thread stopper([&] { server->Shutdown(); });
  const auto start = Clock::now();
  caller.WaitAll(deadline);
  const auto waited = Clock::now() - start;
  stopper.join();
  const absl::Status s = caller.result(0).status;
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find("expert server 0 data plane at 127.0.0.1:"), std::string::npos) << s;
  EXPECT_LT(waited, std::chrono::seconds(5));
  // The next call does not start (nothing listens): the caller goes by gRPC instead.
  EXPECT_FALSE(caller.Start(0, small.View(), Clock::now() + milliseconds(2000)).ok());
}

TEST_F(ExpertLinksTest, TwoLanesToOneServerConcurrently) {
  auto server = StartServer(/*insecure=*/false);
  ASSERT_NE(server, nullptr);
  const rpc::TransportSecurity security = ClientSecurity(false);
  std::vector<CallData> calls;
  std::vector<std::vector<double>> want;
  for (int i = 0; i < 6; ++i) {
    calls.push_back(MakeCall(config_, 1 + (i % 3), 1 + 5 * i, 100 + i));
    want.push_back(Reference(*weights_, calls.back()));
  }
  std::atomic<int> mismatches{0}, failures{0};
  auto lane = [&](int offset) {
    ExpertLinks links(1, security, config_.hidden_size);
    links.SetEndpoint(0, "127.0.0.1", server->data_port());
    for (int round = 0; round < 20; ++round) {
      const size_t i = static_cast<size_t>((round + offset) % calls.size());
      const ExpertLinks::Result& r = Call(links, calls[i]);
      if (!r.status.ok()) {
        ++failures;
        continue;
      }
      for (size_t j = 0; j < want[i].size(); ++j) {
        if (std::abs(r.output[j] - want[i][j]) > 2e-3 + 2e-3 * std::abs(want[i][j])) {
          ++mismatches;
          break;
        }
      }
    }
  };
  std::thread a(lane, 0), b(lane, 3);
  a.join();
  b.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_EQ(mismatches.load(), 0);
}

}  // namespace
}  // namespace dsmoe
