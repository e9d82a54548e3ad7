// `--expert-transport nccl`: the attention server's side channel to the expert servers' GPUs
// (NcclLinks), where it can exist.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "core/rpc/transport_security.h"
#include "core/util/device.h"
#include "expert-server/grpc_expert_executor.h"

namespace dsmoe {

// NCCL channels from `device` to the expert servers at `addresses` (opened in the background as
// dispatch first needs them). FAILED_PRECONDITION saying why where there can be none: an
// attention server on the CPU, or a build without CUDA. The caller then keeps to gRPC.
absl::StatusOr<std::unique_ptr<DispatchSideChannel>> OpenNcclTransport(
    const Device& device, const std::vector<std::string>& addresses,
    const rpc::TransportSecurity& security, int64_t hidden, int64_t max_rows);

}  // namespace dsmoe
