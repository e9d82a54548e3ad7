// End-to-end decode throughput of the cluster (gateway + 1 attention server + 2 expert servers,
// separate processes on 127.0.0.1) against the single-process engine (the same continuous-
// batching scheduler with local experts), at 1, 8 and 32 concurrent streams, in one run; and
// the per-layer dispatch round trip to an expert server against a bare gRPC echo of the same
// bytes.
//
//   dsmoe_bench_cluster [--model DIR] [--streams 1,8,32] [--tokens 32] [--prompt 16]
//                       [--insecure 1] [--cluster-flags "--micro-batches 1 ..."]
//
// The cluster runs as `cluster up` starts it: TLS, mutual TLS between the servers and an API
// key at the gateway; --insecure 1 runs it in plain text instead, to measure what TLS costs.
//
// Without --model it writes the small preset (BF16) under /tmp/dsmoe-bench. Both sides share
// this machine's cores, as they would on one host.
#include <grpcpp/grpcpp.h>

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
  size_t request_bytes;
  double rtt_us, compute_us, echo_us;
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
  std::string hidden(static_cast<size_t>(tokens * H) * 4, '\0');
  for (size_t i = 0; i < hidden.size() / 4; ++i)
    reinterpret_cast<float*>(hidden.data())[i] = 0.01f * static_cast<float>(i % 97);
  req.set_hidden(hidden);
  // Half of each token's top-k lands on this server (two servers, round-robin placement).
  for (int t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < k / 2; ++j) {
      req.add_token(static_cast<uint32_t>(t));
      req.add_expert(static_cast<uint32_t>(experts[(t * 3 + j) % experts.size()]));
      req.add_weight(0.1f);
    }
  }
  internal::v1::EchoMessage echo;
  echo.set_payload(std::string(req.ByteSizeLong(), 'x'));
  std::vector<double> rtt, compute, echo_rtt;
  for (int i = 0; i < 60; ++i) {
    grpc::ClientContext ctx;
    internal::v1::ComputeExpertsResponse resp;
    const auto t0 = Clock::now();
    const grpc::Status s = stub->ComputeExperts(&ctx, req, &resp);
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    grpc::ClientContext ectx;
    internal::v1::EchoMessage eresp;
    const auto t1 = Clock::now();
    stub->Echo(&ectx, echo, &eresp);
    const double eus = std::chrono::duration<double, std::micro>(Clock::now() - t1).count();
    if (i < 10 || !s.ok()) continue;  // warm-up
    rtt.push_back(us);
    compute.push_back(resp.compute_seconds() * 1e6);
    echo_rtt.push_back(eus);
  }
  return {tokens, req.ByteSizeLong(), Median(rtt), Median(compute), Median(echo_rtt)};
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
  std::printf(
      "\n| tokens | request bytes | dispatch RTT µs | expert compute µs | transport µs | bare echo "
      "µs | transport / echo |\n|---|---|---|---|---|---|---|\n");
  for (int t : {1, 8, 32}) {
    const DispatchRow r = MeasureDispatch(expert0, security, c, placement->ExpertsOf(0), t);
    std::printf("| %d | %zu | %.0f | %.0f | %.0f | %.0f | %.2f |\n", r.tokens, r.request_bytes,
                r.rtt_us, r.compute_us, r.rtt_us - r.compute_us, r.echo_us,
                (r.rtt_us - r.compute_us) / r.echo_us);
  }
  return 0;
}
