// Dispatch planning: for one MoE layer's routing of a batch, what each expert server must do —
// which token rows it needs and which (token, expert, weight) assignments — choosing one
// replica for every (token, expert) so the servers' loads stay even.
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
  explicit DispatchPlanner(const Placement& placement);

  // Servers marked unavailable get no work; an expert with no available holder fails the plan
  // with UNAVAILABLE naming it.
  void SetAvailable(int server, bool available) { available_[server] = available; }

  // Fills work[s] for every server s from the routing [T, k] of `layer`. Among an expert's
  // available holders, each assignment goes to the one with the fewest assignments so far in
  // this plan (ties: the first listed), which spreads replicated hot experts evenly.
  absl::Status Plan(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                    const float* weights, std::vector<ServerWork>* work);

 private:
  const Placement& placement_;
  std::vector<bool> available_;
  std::vector<int64_t> load_;       // assignments per server in the current plan
  std::vector<int32_t> row_index_;  // per server: batch row → index into rows, or -1
};

}  // namespace dsmoe::router
