// absl::Status <-> grpc::Status at the RPC boundary. Both use the same canonical codes, so the
// conversion is exact. Every conversion in the services goes through here: a hand-written
// static_cast of the code elsewhere is a conversion that can drift (and did).
#pragma once

#include <grpcpp/support/status.h>

#include "absl/strings/string_view.h"
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

// The same, with `context` (which server, which call) before the peer's message:
// "<context>: <message>". The code is kept, so callers can still tell a transport failure
// (UNAVAILABLE, DEADLINE_EXCEEDED) from a refusal.
inline absl::Status FromGrpc(const grpc::Status& s, absl::string_view context) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(context, ": ", s.error_message()));
}

// Whether a failed call says nothing about the request, only that the peer could not be reached
// in time (dead, restarting, frozen past the deadline): the call may succeed elsewhere.
inline bool IsTransportFailure(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE ||
         s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
}

}  // namespace dsmoe::rpc
