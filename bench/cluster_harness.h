// What the cluster benchmarks share: the single-process engine's decode rate, a cluster started
// as `dsmoe cluster up` starts it (stopped when destroyed), streams through its gateway, and
// its processes' Prometheus metrics read back.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/model/weights.h"
#include "core/rpc/transport_security.h"
#include "core/util/status.h"

namespace dsmoe::bench {

// The prompt of stream `stream`: `length` token ids spread over the vocabulary.
std::vector<int32_t> StreamPrompt(int stream, int length, int64_t vocab);

// Tokens per second of `streams` concurrent greedy streams of `tokens` tokens each through the
// single-process engine (the continuous-batching scheduler with local experts, all cores).
double SingleProcessTokensPerSecond(const ModelWeights& weights, int streams, int tokens,
                                    int prompt_len);

// One `dsmoe cluster up` (1 attention server, `expert_servers` expert servers, a gateway) with
// extra flags; `dsmoe cluster down` when destroyed.
class BenchCluster {
 public:
  static absl::StatusOr<std::unique_ptr<BenchCluster>> Up(const std::string& model,
                                                          int expert_servers,
                                                          const std::string& extra_flags);
  ~BenchCluster();

  const nlohmann::json& info() const { return info_; }  // cluster.json
  const rpc::TransportSecurity& security() const { return security_; }
  // The address of the first process of `role` with index `index` ("" if none).
  std::string Address(const std::string& role, int index = 0) const;

  // Tokens per second of `streams` concurrent greedy streams through the gateway; failed
  // streams are reported on stderr.
  double Generate(int64_t vocab, int streams, int tokens, int prompt_len) const;
  // The /metrics text of every process of `role`.
  std::vector<std::string> Scrape(const std::string& role) const;

 private:
  BenchCluster() = default;
  std::string state_dir_;
  nlohmann::json info_;
  rpc::TransportSecurity security_ = rpc::TransportSecurity::Insecure();
  std::string api_key_;
};

// The sum of the samples of metric `name` (exactly that name, any labels) whose label text
// contains `label_filter`, over Prometheus text exposition `text`.
double MetricSum(const std::string& text, const std::string& name,
                 const std::string& label_filter = "");

}  // namespace dsmoe::bench
