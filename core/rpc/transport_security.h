// Transport security of every dsmoe gRPC endpoint and channel: TLS with a certificate and key
// read from files, the cluster CA that verifies peers, and mutual TLS between the services
// (a server may require a client certificate signed by the CA; every internal channel presents
// the process's own certificate). One options struct, filled by one set of flags
// (security_flags.h), used by the gateway, attention and expert servers and every client.
//
// Files are read and checked once, at start-up (Load): a certificate that does not match its
// key, is expired or not yet valid, or is not signed by the given CA is an error there, not a
// handshake failure later. Certificates are not re-read while running: rotating them means
// restarting the pod (docs/security.md says how, without downtime).
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "core/util/status.h"

namespace dsmoe::rpc {

struct TransportSecurityOptions {
  // Plain text, no TLS: only when asked for explicitly (a warning is logged at start-up).
  bool insecure = false;
  // PEM certificate (chain, leaf first) of this process: served on its port and presented as
  // its client certificate on calls to other dsmoe services. With key_file, or neither.
  std::string cert_file;
  std::string key_file;  // PEM private key of cert_file
  // PEM CA certificate(s) of the cluster: verify client certificates presented to this server
  // and the certificates of the servers this process calls. Empty on a client: the system's
  // roots (a public gateway certificate).
  std::string ca_file;
  // Mutual TLS on this server's port: refuse clients without a certificate signed by ca_file.
  // On by default (internal services); the public gateway turns it off unless configured.
  bool require_client_cert = true;
  // The name expected in the certificates of servers this process calls (default: the host of
  // the address dialled). For certificates that name a service rather than each pod.
  std::string server_name;
};

// The loaded, checked material. Copyable (PEM strings); const after Load.
class TransportSecurity {
 public:
  // Reads and checks the files named by `options` (see the file comment). Errors name the file
  // and the problem and never include key material.
  static absl::StatusOr<TransportSecurity> Load(const TransportSecurityOptions& options);
  // Plain text, for callers that chose it explicitly (tests, tools with --insecure).
  static TransportSecurity Insecure();

  bool insecure() const { return options_.insecure; }
  bool has_certificate() const { return !cert_pem_.empty(); }
  const TransportSecurityOptions& options() const { return options_; }
  // The loaded PEM material, for transports other than gRPC (the expert data plane's TLS).
  // Empty when not loaded.
  const std::string& cert_pem() const { return cert_pem_; }
  const std::string& key_pem() const { return key_pem_; }
  const std::string& ca_pem() const { return ca_pem_; }

  // What a server serves with. Fails when TLS is on and there is no certificate, or a client
  // certificate is required and there is no CA to verify it.
  absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentials() const;
  // What a channel to a dsmoe service uses: the CA (or the system roots) and, if loaded, this
  // process's certificate as its client certificate.
  std::shared_ptr<grpc::ChannelCredentials> ChannelCredentials() const;
  // Adds the channel arguments security needs (the expected server name, if set).
  void ConfigureChannel(grpc::ChannelArguments* args) const;

  // One line for the start-up log: "TLS (client certificates required, CA ...)" or
  // "PLAINTEXT".
  std::string Describe() const;

 private:
  TransportSecurityOptions options_;
  std::string cert_pem_, key_pem_, ca_pem_;
};

}  // namespace dsmoe::rpc
