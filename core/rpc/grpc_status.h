// absl::Status <-> grpc::Status at the RPC boundary. Both use the same canonical codes, so the
// conversion is exact.
#pragma once

#include <grpcpp/support/status.h>

#include "core/util/status.h"

namespace dsmoe::rpc {

inline grpc::Status ToGrpc(const absl::Status& s) {
  if (s.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(s.code()), std::string(s.message()));
}

inline absl::Status FromGrpc(const grpc::Status& s) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()), s.error_message());
}

}  // namespace dsmoe::rpc
