#include "router/dispatch.h"

#include <set>

namespace dsmoe::router {

DispatchPlanner::DispatchPlanner(const Placement& placement)
    : available_(placement.num_servers(), true) {
  SetPlacement(placement);
}

void DispatchPlanner::SetPlacement(const Placement& placement) {
  placement_ = &placement;
  available_.resize(placement.num_servers(), true);
  credit_offset_.assign(placement.num_layers(), {});
  int64_t n = 0;
  for (int l = 0; l < placement.num_layers(); ++l) {
    for (int64_t e = 0; e < placement.num_experts(l); ++e) {
      credit_offset_[l].push_back(n);
      n += static_cast<int64_t>(placement.Holders(l, e).size());
    }
  }
  credit_.assign(n, 0.0);
}

absl::Status DispatchPlanner::Plan(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                                   const float* weights, std::vector<ServerWork>* work) {
  const int S = placement_->num_servers();
  work->resize(S);
  for (ServerWork& w : *work) w.Clear();
  row_index_.assign(static_cast<size_t>(S) * T, -1);
  std::set<int32_t> missing;  // experts without an available holder (stays empty normally)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = experts[t * k + j];
      const std::vector<int>& holders = placement_->Holders(layer, e);
      int best = -1;
      if (holders.size() == 1) {
        if (available_[holders[0]]) best = holders[0];
      } else {
        const std::vector<double>& shares = placement_->Shares(layer, e);
        double* credit = credit_.data() + credit_offset_[layer][e];
        double total = 0;
        int best_r = -1;
        for (size_t r = 0; r < holders.size(); ++r) {
          if (!available_[holders[r]]) continue;
          credit[r] += shares[r];
          total += shares[r];
          if (best_r < 0 || credit[r] > credit[best_r]) best_r = static_cast<int>(r);
        }
        if (best_r >= 0) {
          credit[best_r] -= total;
          best = holders[best_r];
        }
      }
      if (best < 0) {
        missing.insert(e);  // the whole plan is checked, so the error names every such expert
        continue;
      }
      ServerWork& w = (*work)[best];
      int32_t& idx = row_index_[static_cast<size_t>(best) * T + t];
      if (idx < 0) {
        idx = static_cast<int32_t>(w.rows.size());
        w.rows.push_back(static_cast<int32_t>(t));
      }
      w.token.push_back(idx);
      w.expert.push_back(e);
      w.weight.push_back(weights[t * k + j]);
    }
  }
  if (!missing.empty()) {
    std::set<int> down;
    std::string names;
    for (int32_t e : missing) {
      absl::StrAppend(&names, names.empty() ? "" : ", ", e);
      for (int s : placement_->Holders(layer, e)) down.insert(s);
    }
    std::string servers;
    for (int s : down) absl::StrAppend(&servers, servers.empty() ? "" : ", ", s);
    return absl::UnavailableError(
        absl::StrCat("no available expert server holds routed experts of layer ", layer, " [",
                     names, "] (expert servers holding them: ", servers, ", none available)"));
  }
  return absl::OkStatus();
}

}  // namespace dsmoe::router
