// What the client subcommands (`client generate`, `placement`) read from the state directory
// `dsmoe cluster up` leaves (cluster.json): the processes' addresses, and how a client of the
// cluster calls them (its CA and client certificate, or plain text).
#pragma once

#include <nlohmann/json.hpp>
#include <string>

#include "core/rpc/transport_security.h"
#include "core/util/status.h"

namespace dsmoe::cli {

// A client's TLS flags; empty fields come from the cluster state.
struct ClientTls {
  std::string ca, cert, key, server_name;
  bool insecure = false;
};

// <dir>/cluster.json (dir empty: .dsmoe-cluster), parsed. NOT_FOUND naming the file when there is
// none, INVALID_ARGUMENT when it is not JSON.
absl::StatusOr<nlohmann::json> ReadClusterState(const std::string& dir);

// The string field `field` of the state's security section ("" if absent).
std::string StateSecurityField(const nlohmann::json& state, const char* field);

// The channel security of a client: explicit flags win over the state's CA and client
// certificate; plain text with --insecure, or when the state says the cluster runs without TLS
// and no CA is given. `state` may be empty (null) when there is none.
absl::StatusOr<rpc::TransportSecurity> ClientSecurity(const nlohmann::json& state,
                                                      const ClientTls& flags);

}  // namespace dsmoe::cli
