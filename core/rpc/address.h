// Splitting the addresses servers listen on and clients dial: "host:port", "[v6]:port", or a
// gRPC target "dns:///host:port". One parser for the gRPC, data-plane and HTTP listeners and
// for the data-plane client, so that all of them read an address the same way.
#pragma once

#include <string>

#include "absl/strings/string_view.h"
#include "core/util/status.h"

namespace dsmoe::rpc {

struct HostPort {
  std::string host;  // without the brackets of an IPv6 literal; "" when the address had none
  int port = 0;      // [0, 65535]
};

// INVALID_ARGUMENT naming the address when it has no ':' or no port in [0, 65535].
absl::StatusOr<HostPort> SplitHostPort(absl::string_view address);

}  // namespace dsmoe::rpc
