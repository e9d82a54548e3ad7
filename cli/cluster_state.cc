#include "cli/cluster_state.h"

#include <filesystem>

#include "core/io/mapped_file.h"

namespace dsmoe::cli {

absl::StatusOr<nlohmann::json> ReadClusterState(const std::string& dir) {
  const std::string file =
      (std::filesystem::path(dir.empty() ? ".dsmoe-cluster" : dir) / "cluster.json").string();
  auto text = ReadTextFile(file, 1 << 20);
  if (!text.ok()) {
    return absl::NotFoundError(
        absl::StrCat("no cluster state in ", file, " (", text.status().message(), ")"));
  }
  nlohmann::json state = nlohmann::json::parse(*text, nullptr, false);
  if (state.is_discarded()) return absl::InvalidArgumentError(file + " is not JSON");
  return state;
}

std::string StateSecurityField(const nlohmann::json& state, const char* field) {
  if (!state.is_object() || !state.contains("security") || !state["security"].contains(field)) {
    return "";
  }
  const auto& v = state["security"][field];
  return v.is_string() ? v.get<std::string>() : "";
}

absl::StatusOr<rpc::TransportSecurity> ClientSecurity(const nlohmann::json& state,
                                                      const ClientTls& flags) {
  rpc::TransportSecurityOptions tls;
  const bool state_insecure =
      state.is_object() && state.contains("security") && !state["security"].value("tls", true);
  tls.insecure = flags.insecure || (flags.ca.empty() && state_insecure);
  tls.ca_file = !flags.ca.empty() ? flags.ca : StateSecurityField(state, "ca");
  tls.cert_file = !flags.cert.empty() ? flags.cert
                  : flags.key.empty() ? StateSecurityField(state, "client_cert")
                                      : "";
  tls.key_file = !flags.key.empty()   ? flags.key
                 : flags.cert.empty() ? StateSecurityField(state, "client_key")
                                      : "";
  tls.server_name = flags.server_name;
  return rpc::TransportSecurity::Load(tls);
}

}  // namespace dsmoe::cli
