#include "router/device_limit.h"

namespace dsmoe::router {

absl::StatusOr<DeviceLimitedRouting> DeviceLimitedRoutingFor(const Placement& placement,
                                                             int max_servers) {
  std::vector<std::vector<std::vector<int>>> holders(placement.num_layers());
  for (int layer = 0; layer < placement.num_layers(); ++layer) {
    for (int64_t e = 0; e < placement.num_experts(layer); ++e) {
      holders[layer].push_back(placement.Holders(layer, e));
    }
  }
  return DeviceLimitedRouting::Create(placement.num_servers(), max_servers, holders);
}

}  // namespace dsmoe::router
