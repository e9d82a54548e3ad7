// End-to-end decode throughput of the cluster (gateway + 1 attention server + 2 expert servers,
// separate processes on 127.0.0.1) against the single-process engine (the same continuous-
// batching scheduler with local experts), at 1, 8 and 32 concurrent streams, in one run; and
// the per-layer dispatch round trip to an expert server: over gRPC against a bare gRPC echo of
// the same bytes, and over the data plane (ExpertLinks, expert-server/README.md "Data plane")
// against a raw TCP ping-pong of exactly its request and reply bytes (loopback, TCP_NODELAY, a
// tiny echo peer in this process): the floor any framed protocol over TCP is judged by.
//
//   dsmoe_bench_cluster [--model DIR] [--streams 1,8,32] [--tokens 32] [--prompt 16]
//                       [--insecure 1] [--cluster-flags "--micro-batches 1 ..."]
//
// The cluster runs as `cluster up` starts it: TLS, mutual TLS between the servers and an API
// key at the gateway; --insecure 1 runs it in plain text instead, to measure what TLS costs.
//
// Without --model it writes the small preset (BF16) under /tmp/dsmoe-bench. Both sides share
// this machine's cores, as they would on one host.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>
#include <vector>

#include "bench/cluster_harness.h"
#include "core/io/mapped_file.h"
#include "core/model/make_model.h"
#include "core/rpc/server.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"
#include "dsmoe/v1/gateway.grpc.pb.h"
#include "expert-server/client/expert_links.h"
#include "expert-server/data_plane_frame.h"
#include "router/placement.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;
namespace fs = std::filesystem;

std::vector<int> SplitInts(const std::string& s) {
  std::vector<int> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(std::stoi(item));
  return out;
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct DispatchRow {
  int tokens;
  size_t request_bytes, reply_bytes;  // gRPC messages (protobuf size)
  double rtt_us, compute_us, echo_us;
  // The data plane: frame bytes each way, round trip, the server's compute, and the raw TCP
  // ping-pong of the same bytes. 0 without a data plane.
  size_t frame_sent = 0, frame_received = 0;
  double dp_rtt_us = 0, dp_compute_us = 0, tcp_us = 0;
};

// Sends a whole buffer / receives exactly n bytes on a blocking socket.
bool SendAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t k = ::send(fd, p, n, MSG_NOSIGNAL);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}
bool ReceiveAll(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t k = ::recv(fd, p, n, 0);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<size_t>(k);
  }
  return true;
}

void NoDelay(int fd) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// The raw TCP floor: a peer on 127.0.0.1 that answers every request_bytes received with
// reply_bytes, and a connected client. Plain TCP, TCP_NODELAY on both ends, no framing.
class TcpPingPong {
 public:
  TcpPingPong(size_t request_bytes, size_t reply_bytes)
      : request_(request_bytes, 'q'), reply_(reply_bytes, 'r') {
    const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(a);
    ::bind(listener, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    ::listen(listener, 1);
    ::getsockname(listener, reinterpret_cast<sockaddr*>(&a), &len);
    peer_ = std::thread([this, listener] {
      const int fd = ::accept(listener, nullptr, nullptr);
      ::close(listener);
      NoDelay(fd);
      std::string in(request_.size(), '\0');
      while (ReceiveAll(fd, in.data(), in.size()) && SendAll(fd, reply_.data(), reply_.size())) {
      }
      ::close(fd);
    });
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    ::connect(fd_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    NoDelay(fd_);
    in_.resize(reply_.size());
  }
  ~TcpPingPong() {
    ::shutdown(fd_, SHUT_RDWR);
    ::close(fd_);
    peer_.join();
  }
  // One round trip, µs.
  double RoundTrip() {
    const auto t0 = Clock::now();
    if (!SendAll(fd_, request_.data(), request_.size()) ||
        !ReceiveAll(fd_, in_.data(), in_.size())) {
      return 0;
    }
    return std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
  }

 private:
  std::string request_, reply_, in_;
  int fd_ = -1;
  std::thread peer_;
};

DispatchRow MeasureDispatch(const std::string& expert_address,
                            const rpc::TransportSecurity& security, const ModelConfig& c,
                            const std::vector<std::pair<int64_t, int64_t>>& held, int tokens) {
  auto stub = internal::v1::ExpertService::NewStub(rpc::MakeChannel(expert_address, security));
  const int64_t layer = held.front().first, H = c.hidden_size, k = c.num_experts_per_tok;
  std::vector<int64_t> experts;
  for (auto [l, e] : held)
    if (l == layer) experts.push_back(e);
  internal::v1::ComputeExpertsRequest req;
  req.set_layer(static_cast<uint32_t>(layer));
  req.set_num_tokens(static_cast<uint32_t>(tokens));
  std::vector<float> x(static_cast<size_t>(tokens * H));
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.01f * static_cast<float>(i % 97);
  req.set_hidden(std::string(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float)));
  // Half of each token's top-k lands on this server (two servers, round-robin placement).
  std::vector<int32_t> rows(static_cast<size_t>(tokens)), token, expert;
  std::vector<float> weight;
  for (int t = 0; t < tokens; ++t) {
    rows[t] = t;
    for (int64_t j = 0; j < k / 2; ++j) {
      req.add_token(static_cast<uint32_t>(t));
      req.add_expert(static_cast<uint32_t>(experts[(t * 3 + j) % experts.size()]));
      req.add_weight(0.1f);
      token.push_back(t);
      expert.push_back(static_cast<int32_t>(experts[(t * 3 + j) % experts.size()]));
      weight.push_back(0.1f);
    }
  }
  internal::v1::EchoMessage echo;
  echo.set_payload(std::string(req.ByteSizeLong(), 'x'));

  // The data plane of the same server: its port from GetExperts, the host of its address.
  grpc::ClientContext gctx;
  internal::v1::GetExpertsResponse info;
  const int data_port = stub->GetExperts(&gctx, {}, &info).ok() ? info.data_port() : 0;
  ExpertLinks links(1, security, H);
  links.SetEndpoint(0, expert_address.substr(0, expert_address.rfind(':')), data_port);
  const LinkCall call{static_cast<uint32_t>(layer), x.data(), rows, token, expert, weight};
  const size_t frame_sent = sizeof(data_plane::RequestHeader) +
                            data_plane::RequestPayloadBytes(tokens, token.size(), H);
  const size_t frame_received = sizeof(data_plane::ReplyHeader) + tokens * H * sizeof(float);
  TcpPingPong tcp(frame_sent, frame_received);

  size_t reply_bytes = 0;
  std::vector<double> rtt, compute, echo_rtt, dp_rtt, dp_compute, tcp_rtt;
  for (int i = 0; i < 60; ++i) {
    grpc::ClientContext ctx;
    internal::v1::ComputeExpertsResponse resp;
    const auto t0 = Clock::now();
    const grpc::Status s = stub->ComputeExperts(&ctx, req, &resp);
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    reply_bytes = resp.ByteSizeLong();
    grpc::ClientContext ectx;
    internal::v1::EchoMessage eresp;
    const auto t1 = Clock::now();
    stub->Echo(&ectx, echo, &eresp);
    const double eus = std::chrono::duration<double, std::micro>(Clock::now() - t1).count();
    double dp_us = 0;
    bool dp_ok = false;
    if (data_port != 0) {
      const auto t2 = Clock::now();
      const auto deadline = t2 + std::chrono::seconds(10);
      dp_ok = links.Start(0, call, deadline).ok();
      if (dp_ok) {
        links.WaitAll(deadline);
        dp_ok = links.result(0).status.ok();
      }
      dp_us = std::chrono::duration<double, std::micro>(Clock::now() - t2).count();
      if (!dp_ok && i == 59) {
        std::fprintf(stderr, "data plane: %s\n",
                     std::string(links.result(0).status.message()).c_str());
      }
    }
    const double tcp_us = tcp.RoundTrip();
    if (i < 10) continue;  // warm-up
    if (s.ok()) {
      rtt.push_back(us);
      compute.push_back(resp.compute_seconds() * 1e6);
      echo_rtt.push_back(eus);
    }
    if (dp_ok) {
      dp_rtt.push_back(dp_us);
      dp_compute.push_back(links.result(0).compute_seconds * 1e6);
    }
    tcp_rtt.push_back(tcp_us);
  }
  DispatchRow row{tokens, req.ByteSizeLong(), reply_bytes, Median(rtt), Median(compute),
                  Median(echo_rtt)};
  if (!dp_rtt.empty()) {
    row.frame_sent = frame_sent;
    row.frame_received = frame_received;
    row.dp_rtt_us = Median(dp_rtt);
    row.dp_compute_us = Median(dp_compute);
  }
  row.tcp_us = Median(tcp_rtt);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  std::string model, streams_arg = "1,8,32", threads = "0", cluster_flags;
  bool insecure = false;
  int tokens = 32, prompt_len = 16;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--model")
      model = value;
    else if (flag == "--streams")
      streams_arg = value;
    else if (flag == "--tokens")
      tokens = std::stoi(value);
    else if (flag == "--prompt")
      prompt_len = std::stoi(value);
    else if (flag == "--cluster-threads")
      threads = value;
    else if (flag == "--insecure")
      insecure = value == "1";
    else if (flag == "--cluster-flags")
      cluster_flags = value;
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (model.empty()) {
    model = "/tmp/dsmoe-bench/small-bf16";
    if (!fs::exists(model + "/config.json")) {
      std::printf("writing %s ...\n", model.c_str());
      if (!WriteRandomCheckpoint(*PresetConfig("small"), {DType::kBF16, 1, 1}, model).ok())
        return 1;
    }
  }
  auto weights = ModelWeights::Load(model);
  if (!weights.ok()) {
    std::fprintf(stderr, "%s\n", std::string(weights.status().message()).c_str());
    return 1;
  }
  const ModelConfig& c = (*weights)->config();

  // The cluster, as `dsmoe cluster up` starts it.
  auto cluster =
      bench::BenchCluster::Up(model, 2,
                              (threads != "0" ? " --threads " + threads : std::string()) +
                                  (insecure ? " --insecure --no-auth " : " ") + cluster_flags);
  if (!cluster.ok()) {
    std::fprintf(stderr, "%s\n", std::string(cluster.status().message()).c_str());
    return 1;
  }
  const rpc::TransportSecurity& security = (*cluster)->security();
  const std::string expert0 = (*cluster)->Address("expert-server", 0);
  auto placement_text = ReadTextFile((*cluster)->info()["placement"].get<std::string>(), 64 << 20);
  auto placement = router::Placement::FromJson(*placement_text, c, "placement");

  std::printf("transport: %s\n", security.Describe().c_str());
  std::printf("model %s: %lld layers, hidden %lld, %lld routed experts (top-%lld) + %lld shared\n",
              model.c_str(), (long long)c.num_hidden_layers, (long long)c.hidden_size,
              (long long)c.n_routed_experts, (long long)c.num_experts_per_tok,
              (long long)c.n_shared_experts);
  std::printf(
      "\n| streams | single process tok/s | cluster tok/s | cluster / single "
      "|\n|---|---|---|---|\n");
  bench::SingleProcessTokensPerSecond(**weights, 4, 4, prompt_len);  // page the weights in
  (*cluster)->Generate(c.vocab_size, 4, 4, prompt_len);
  for (int n : SplitInts(streams_arg)) {
    const double single = bench::SingleProcessTokensPerSecond(**weights, n, tokens, prompt_len);
    const double clustered = (*cluster)->Generate(c.vocab_size, n, tokens, prompt_len);
    std::printf("| %d | %.1f | %.1f | %.2f |\n", n, single, clustered, clustered / single);
    std::fflush(stdout);
  }
  // One message each way per call on both paths (a unary gRPC call; one request and one reply
  // frame on the data plane); bytes are per call.
  std::printf(
      "\n| tokens | gRPC bytes req/reply | gRPC RTT µs | compute µs | gRPC transport µs | bare "
      "echo µs | gRPC transport / echo | data-plane bytes req/reply | data-plane RTT µs | compute "
      "µs | data-plane transport µs | raw TCP µs | data-plane transport / raw TCP "
      "|\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
  for (int t : {1, 8, 32}) {
    const DispatchRow r = MeasureDispatch(expert0, security, c, placement->ExpertsOf(0), t);
    const double dp_transport = r.dp_rtt_us - r.dp_compute_us;
    std::printf(
        "| %d | %zu / %zu | %.0f | %.0f | %.0f | %.0f | %.2f | %zu / %zu | %.0f | %.0f | %.0f | "
        "%.0f | %.2f |\n",
        r.tokens, r.request_bytes, r.reply_bytes, r.rtt_us, r.compute_us, r.rtt_us - r.compute_us,
        r.echo_us, (r.rtt_us - r.compute_us) / r.echo_us, r.frame_sent, r.frame_received,
        r.dp_rtt_us, r.dp_compute_us, dp_transport, r.tcp_us, dp_transport / r.tcp_us);
    std::fflush(stdout);
  }
  return 0;
}
