// The expert server's data plane: ComputeExperts over a lean framed protocol on TCP (TLS by
// default, with the gRPC port's transport security), for attention servers whose per-call gRPC
// overhead would dominate a decode step (expert-server/README.md, "Data plane", and
// data_plane_frame.h for the bytes). gRPC stays the control plane and the fallback.
//
// One thread runs an Asio io_context for every connection (no thread per connection); each
// complete request frame is computed on it through ExpertService::Compute, the code gRPC
// ComputeExperts runs (same checks, metrics and serialisation). Buffers are per connection and
// only grow: no allocation per call once warm.
//
// Thread-safe: port() is const after Start; Shutdown may be called from any thread, any number
// of times.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/rpc/transport_security.h"
#include "core/util/log.h"
#include "core/util/status.h"
#include "expert-server/expert_service.h"

namespace dsmoe {

struct DataPlaneServerOptions {
  // host:port to listen on; port 0: an ephemeral one (port() says which).
  std::string listen = "127.0.0.1:0";
  // Connections at most (each attention-server lane holds one): more are closed at once.
  int max_connections = 256;
  // Where refused connections and failures are logged. Not owned; must outlive the server.
  Logger* logger = DefaultLogger();
};

class DataPlaneServer {
 public:
  // Listens with `security` (TLS with its certificate; client certificates verified against
  // its CA when required; plain TCP when insecure) and serves `service`, which must outlive
  // the server.
  static absl::StatusOr<std::unique_ptr<DataPlaneServer>> Start(
      ExpertService& service, const rpc::TransportSecurity& security,
      const DataPlaneServerOptions& options);
  ~DataPlaneServer();  // Shutdown()
  DataPlaneServer(const DataPlaneServer&) = delete;
  DataPlaneServer& operator=(const DataPlaneServer&) = delete;

  int port() const;

  // Stops accepting, lets a computation in progress finish, closes every connection (their
  // clients fail over to replicas) and joins the thread.
  void Shutdown();

 private:
  struct Impl;
  explicit DataPlaneServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsmoe
