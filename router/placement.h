// Placement: which expert servers hold which routed experts. A logical expert (layer, expert)
// has one or more physical copies (replicas), each on a different expert server.
//
// Immutable after construction; thread-safe.
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
  std::string ToJson() const;

  int num_servers() const { return num_servers_; }
  // Servers holding (layer, expert); empty for dense layers.
  const std::vector<int>& Holders(int64_t layer, int64_t expert) const {
    return holders_[layer][expert];
  }
  // What expert server `server` must load.
  WeightSelection SelectionFor(int server) const;
  // (layer, expert) pairs server `server` holds, ordered.
  std::vector<std::pair<int64_t, int64_t>> ExpertsOf(int server) const;

 private:
  Placement(int num_servers, std::vector<std::vector<std::vector<int>>> holders)
      : num_servers_(num_servers), holders_(std::move(holders)) {}
  int num_servers_;
  std::vector<std::vector<std::vector<int>>> holders_;  // [layer][expert] → servers
};

}  // namespace dsmoe::router
