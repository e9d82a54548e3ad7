// Placement: which expert servers hold which routed experts. A logical expert (layer, expert)
// has one or more physical copies (replicas), each on a different expert server, and each
// replica a share of the expert's tokens (equal unless a planner chose otherwise; dispatch
// splits tokens in these proportions). A version number tells placements apart while one
// replaces another in a running cluster (router/README.md).
//
// A value type: thread-compatible (const methods may run concurrently; set_version, the one
// mutator, is for a placement not yet shared, as the rebalancer numbers a plan before it is
// published). Shared placements are held as shared_ptr<const Placement>.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "core/model/weights.h"
#include "core/util/status.h"

namespace dsmoe::router {

class Placement {
 public:
  enum class Strategy { kRoundRobin, kContiguous };

  // Every routed expert of every MoE layer on `replicas` distinct servers of `num_servers`.
  // Round-robin: expert e of the i-th MoE layer starts on server (e + i) mod S, so each server
  // gets a mix of every layer's experts; contiguous: experts [e·S/E] in blocks.
  static absl::StatusOr<Placement> Compute(const ModelConfig& config, int num_servers, int replicas,
                                           Strategy strategy);
  // {"num_servers": S, "layers": [{"layer": L, "servers": [[0], [1, 0], ...]}, ...]}: for each
  // MoE layer, per routed expert, the servers holding it. Every routed expert of every MoE
  // layer must be held somewhere.
  static absl::StatusOr<Placement> FromJson(const std::string& text, const ModelConfig& config,
                                            const std::string& source);
  // The placement servers are started with: `file` if given, else round-robin over
  // `num_servers` with `replicas` copies.
  static absl::StatusOr<Placement> LoadOrCompute(const std::string& file, const ModelConfig& config,
                                                 int num_servers, int replicas);
  // Holders [layer][expert] → servers (empty for dense layers) and, optionally, the share of
  // each holder ([layer][expert][replica], positive; empty: equal shares). Checked like
  // FromJson.
  static absl::StatusOr<Placement> FromHolders(int num_servers,
                                               std::vector<std::vector<std::vector<int>>> holders,
                                               std::vector<std::vector<std::vector<double>>> shares,
                                               uint64_t version);
  std::string ToJson() const;

  uint64_t version() const { return version_; }
  void set_version(uint64_t v) { version_ = v; }
  int num_layers() const { return static_cast<int>(holders_.size()); }
  // Routed experts of `layer` (0 for dense layers).
  int64_t num_experts(int64_t layer) const { return static_cast<int64_t>(holders_[layer].size()); }

  int num_servers() const { return num_servers_; }
  // Servers holding (layer, expert); empty for dense layers.
  const std::vector<int>& Holders(int64_t layer, int64_t expert) const {
    return holders_[layer][expert];
  }
  // Share of the expert's tokens of each holder, in Holders order; sums to 1.
  const std::vector<double>& Shares(int64_t layer, int64_t expert) const {
    return shares_[layer][expert];
  }
  // Whether both hold the same experts on the same servers with the same shares.
  bool SameAs(const Placement& other) const {
    return num_servers_ == other.num_servers_ && holders_ == other.holders_ &&
           shares_ == other.shares_;
  }
  // Fewest and most copies any routed expert has (over MoE layers; 0, 0 without any).
  std::pair<int, int> CopiesRange() const;
  // What expert server `server` must load.
  WeightSelection SelectionFor(int server) const;
  // (layer, expert) pairs server `server` holds, ordered.
  std::vector<std::pair<int64_t, int64_t>> ExpertsOf(int server) const;

 private:
  Placement(int num_servers, std::vector<std::vector<std::vector<int>>> holders);
  int num_servers_;
  uint64_t version_ = 1;
  std::vector<std::vector<std::vector<int>>> holders_;    // [layer][expert] → servers
  std::vector<std::vector<std::vector<double>>> shares_;  // [layer][expert][replica]
};

}  // namespace dsmoe::router
