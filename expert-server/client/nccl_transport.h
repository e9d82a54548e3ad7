// `--expert-transport nccl`: the attention server's side channel to the expert servers' GPUs
// (NcclLinks), where it can exist.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/util/device.h"
#include "core/util/log.h"
#include "expert-server/client/expert_dispatcher.h"
#include "expert-server/client/expert_server_pool.h"

namespace dsmoe {

// NCCL channels from `device` to the expert servers of `pool` (opened in the background as
// dispatch first needs them; `pool` must outlive them). FAILED_PRECONDITION saying why where there
// can be none: an attention server on the CPU, or a build without CUDA. The caller then keeps to
// gRPC. The channels log to `logger` (not owned; must outlive them).
absl::StatusOr<std::unique_ptr<DispatchSideChannel>> OpenNcclTransport(
    const Device& device, ExpertServerPool& pool, int64_t hidden, int64_t max_rows,
    Logger* logger = DefaultLogger());

}  // namespace dsmoe
