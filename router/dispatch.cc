#include "router/dispatch.h"

#include <set>

namespace dsmoe::router {

DispatchPlanner::DispatchPlanner(const Placement& placement)
    : placement_(placement),
      available_(placement.num_servers(), true),
      load_(placement.num_servers(), 0) {}

absl::Status DispatchPlanner::Plan(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                                   const float* weights, std::vector<ServerWork>* work) {
  const int S = placement_.num_servers();
  work->resize(S);
  for (ServerWork& w : *work) w.Clear();
  std::fill(load_.begin(), load_.end(), 0);
  row_index_.assign(static_cast<size_t>(S) * T, -1);
  std::set<int32_t> missing;  // experts without an available holder (stays empty normally)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = experts[t * k + j];
      int best = -1;
      for (int s : placement_.Holders(layer, e)) {
        if (available_[s] && (best < 0 || load_[s] < load_[best])) best = s;
      }
      if (best < 0) {
        missing.insert(e);  // the whole plan is checked, so the error names every such expert
        continue;
      }
      ++load_[best];
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
      for (int s : placement_.Holders(layer, e)) down.insert(s);
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
