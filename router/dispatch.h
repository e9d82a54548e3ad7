// Dispatch planning: for one MoE layer's routing of a batch, what each expert server must do —
// which token rows it needs and which (token, expert, weight) assignments — choosing one
// replica for every (token, expert) so that each replica gets its share of the expert's tokens.
//
// Thread-compatible; reuses its buffers, so planning allocates nothing once warmed up.
#pragma once

#include <cstdint>
#include <vector>

#include "router/placement.h"

namespace dsmoe::router {

struct ServerWork {
  std::vector<int32_t> rows;    // batch rows whose hidden states this server needs, ascending
  std::vector<int32_t> token;   // per assignment: index into `rows`
  std::vector<int32_t> expert;  // per assignment
  std::vector<float> weight;    // per assignment
  bool empty() const { return token.empty(); }
  void Clear() {
    rows.clear();
    token.clear();
    expert.clear();
    weight.clear();
  }
};

class DispatchPlanner {
 public:
  // REQUIRES: placement outlives this (or the next SetPlacement).
  explicit DispatchPlanner(const Placement& placement);

  // Plans with `placement` from now on (same number of servers; availability is kept).
  void SetPlacement(const Placement& placement);
  const Placement& placement() const { return *placement_; }

  // Servers marked unavailable get no work; an expert with no available holder fails the plan
  // with UNAVAILABLE naming it.
  void SetAvailable(int server, bool available) { available_[server] = available; }

  // Fills work[s] for every server s from the routing [T, k] of `layer`. A replicated expert's
  // assignments are split over its available holders in proportion to their shares by smooth
  // weighted round-robin (each holder earns its share per assignment, the richest takes it and
  // pays the total): deterministic, within one assignment of the exact proportion at every
  // point, and evenly interleaved within a batch.
  absl::Status Plan(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                    const float* weights, std::vector<ServerWork>* work);

 private:
  const Placement* placement_;
  std::vector<bool> available_;
  std::vector<std::vector<int64_t>> credit_offset_;  // [layer][expert] → index into credit_
  std::vector<double> credit_;                       // per replica: smooth round-robin credit
  std::vector<int32_t> row_index_;  // per server: batch row → index into rows, or -1
};

}  // namespace dsmoe::router
