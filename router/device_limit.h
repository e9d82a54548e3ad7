// Device-limited routing (core/model/gate.h) over the expert servers of a placement: each
// routed expert belongs to every server holding a copy of it.
#pragma once

#include "core/model/gate.h"
#include "router/placement.h"

namespace dsmoe::router {

// INVALID_ARGUMENT naming the numbers unless 1 <= max_servers <= placement.num_servers() <= 64.
absl::StatusOr<DeviceLimitedRouting> DeviceLimitedRoutingFor(const Placement& placement,
                                                             int max_servers);

}  // namespace dsmoe::router
