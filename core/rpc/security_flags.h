// The transport-security flags, identical on every dsmoe server (gateway, attention, expert):
// defined here once, added by each main. Header-only on purpose: CLI11 is slow to compile, so
// only the mains (which already include it) pay for it.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/rpc/transport_security.h"

namespace dsmoe::rpc {

// Adds --tls-cert, --tls-key, --tls-ca, --tls-client-auth, --tls-server-name, --insecure and
// --health-listen. `tls->require_client_cert` holds the server's default on entry (internal
// services: required; the public gateway: not).
inline void AddSecurityFlags(CLI::App& app, TransportSecurityOptions* tls,
                             std::string* health_listen) {
  app.add_option("--tls-cert", tls->cert_file,
                 "PEM certificate (chain) served on --listen and presented as client "
                 "certificate to the other dsmoe services")
      ->check(CLI::ExistingFile)
      ->group("Security");
  app.add_option("--tls-key", tls->key_file, "PEM private key of --tls-cert")
      ->check(CLI::ExistingFile)
      ->group("Security");
  app.add_option("--tls-ca", tls->ca_file,
                 "PEM CA of the cluster: verifies client certificates and the servers this "
                 "process calls")
      ->check(CLI::ExistingFile)
      ->group("Security");
  app.add_option_function<std::string>(
         "--tls-client-auth",
         [tls](const std::string& v) { tls->require_client_cert = v == "require"; },
         "require: refuse clients without a certificate signed by --tls-ca (mutual TLS); "
         "none: any client may connect")
      ->check(CLI::IsMember({"require", "none"}))
      ->default_str(tls->require_client_cert ? "require" : "none")
      ->group("Security");
  app.add_option("--tls-server-name", tls->server_name,
                 "Name expected in the certificates of the servers this process calls "
                 "(default: the host of each address)")
      ->group("Security");
  app.add_flag("--insecure", tls->insecure,
               "Serve and call in PLAINTEXT, without TLS (a warning is logged)")
      ->group("Security");
  app.add_option("--health-listen", *health_listen,
                 "Also serve grpc.health.v1 Health/Check, and nothing else, in plain text "
                 "here (for Kubernetes gRPC probes)")
      ->group("Security");
}

}  // namespace dsmoe::rpc
