// The placement planner: from measured load per routed expert, choose how many replicas each
// expert gets and which expert server holds each, so that the largest per-server load of every
// MoE layer is as small as possible (router/README.md states the algorithm).
//
// Layers are planned independently: every MoE layer's dispatch waits for its slowest expert
// server, so a step costs the sum over layers of each layer's maximum.
//
// Pure functions; thread-safe.
#pragma once

#include <cstdint>
#include <vector>

#include "core/util/status.h"
#include "router/placement.h"

namespace dsmoe::router {

struct PlannerOptions {
  int num_servers = 1;
  // Replica budget: physical experts per layer beyond min_copies per routed expert.
  int num_replicas = 0;
  // Physical experts an expert server may hold per layer (its memory); 0: just enough,
  // ceil((experts + replicas) / servers).
  int slots_per_server = 0;
  // After EPLB's packing: local search (moves and swaps off the most loaded server), then
  // uneven shares for replicated experts (water-filling). Off: EPLB's plan exactly.
  bool refine = true;
  bool uneven_shares = true;
  // With a current placement: keep experts where they are (fewer to load) when that plan's
  // maximum is within this fraction of the best plan's — and never above EPLB's.
  double keep_tolerance = 0.02;
  // The redundancy floor: every routed expert keeps at least this many copies, each on a
  // different server, whatever the load says (the copies asked for at start-up are a promise:
  // a server may die). The replica budget comes on top: num_replicas copies per layer beyond
  // min_copies per expert. At most num_servers.
  int min_copies = 1;
};

// One layer's plan.
struct LayerPlan {
  std::vector<std::vector<int>> holders;    // [expert] → servers, replica order
  std::vector<std::vector<double>> shares;  // [expert][replica], each expert's sum 1
  std::vector<double> server_load;          // [server]: Σ load · share of what it holds
  double max_load() const;
};

// DeepSeek EPLB's baseline (deepseek-ai/EPLB, `replicate_experts` + `balanced_packing`), with
// the constraint that no server holds two replicas of one expert: starting from min_copies of
// each expert, give a replica, num_replicas times, to the expert with the largest load per
// replica; then, heaviest replica first, put
// each on the least-loaded server that has a free slot and does not hold its expert.
absl::StatusOr<LayerPlan> PlanLayerEplb(const std::vector<double>& load,
                                        const PlannerOptions& options);
// EPLB's plan refined (options.refine, options.uneven_shares); its maximum is never above
// EPLB's. `current` ([expert] → servers holding it now), if given, lets it prefer a plan that
// moves fewer experts (options.keep_tolerance).
absl::StatusOr<LayerPlan> PlanLayer(const std::vector<double>& load, const PlannerOptions& options,
                                    const std::vector<std::vector<int>>* current = nullptr);

// Per-server load of `layer` under `placement` (Σ over experts of load · share), and its
// imbalance: max / mean over servers (1 = even; 0 when there is no load).
std::vector<double> ServerLoads(const Placement& placement, int64_t layer,
                                const std::vector<double>& load);
double Imbalance(const std::vector<double>& server_load);

// A new placement for every MoE layer of `current` from loads[layer] ([expert]; empty for dense
// layers), with version current.version() + 1. Servers are relabelled per layer so that each
// keeps as many of the experts it already holds as possible (less to load).
absl::StatusOr<Placement> PlanPlacement(const Placement& current,
                                        const std::vector<std::vector<double>>& loads,
                                        const PlannerOptions& options);

}  // namespace dsmoe::router
