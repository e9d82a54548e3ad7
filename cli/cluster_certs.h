// The throw-away credentials of a local cluster (`dsmoe cluster up`): a CA made for this one
// cluster, a certificate every server serves and presents to the others (mutual TLS), a
// client certificate for `dsmoe client` and tests, and one API key. Made with the openssl
// command-line tool (Debian's openssl package); the CA's key is deleted once both
// certificates are signed, so nothing else can ever be issued under it.
#pragma once

#include <string>

#include "core/util/status.h"

namespace dsmoe::cli {

struct ClusterCredentials {
  std::string ca;                       // PEM CA certificate
  std::string server_cert, server_key;  // every server's identity (127.0.0.1, localhost)
  std::string client_cert, client_key;  // for clients of the gateway (and tests)
  std::string api_key_file;             // the key itself (mode 0600), for clients
  std::string api_key_hashes_file;      // its sha256: line, for the gateway's --api-keys
};

// Writes everything under `dir` (created; existing files replaced). Keys are mode 0600.
absl::StatusOr<ClusterCredentials> MakeClusterCredentials(const std::string& dir);

}  // namespace dsmoe::cli
