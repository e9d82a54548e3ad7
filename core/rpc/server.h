// How every dsmoe service starts: bind (127.0.0.1:0 by default, so tests get an ephemeral
// port) with its transport security (TLS, mutual TLS, or plain text when asked), standard
// grpc.health.v1 health checking and server reflection, message size limits, an optional
// plain-text port serving only health checks (for Kubernetes probes, which cannot present a
// client certificate), and a ready file naming the bound ports for whoever started the process.
#pragma once

#include <grpcpp/grpcpp.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/transport_security.h"
#include "core/util/log.h"
#include "core/util/status.h"

namespace dsmoe::rpc {

struct ServerOptions {
  std::string address = "127.0.0.1:0";  // host:port; port 0 picks a free one
  int max_message_bytes = 64 << 20;     // requests above this are refused by gRPC itself
  std::string ready_file;               // if set, the ports (ReadyPorts) are written here
  int metrics_port = 0;                 // if > 0, the ready file's metrics port
  // TLS and who may connect. The default (TLS without a certificate) refuses to start: the
  // caller sets what it loaded, or TransportSecurity::Insecure() explicitly.
  TransportSecurity security;
  // If set (host:port), a second, plain-text port serving only grpc.health.v1 Health/Check,
  // answered by this server's own health service: what Kubernetes gRPC probes reach.
  std::string health_address;
  // Where the start-up warnings go (plain-text serving). Not owned; must outlive StartServer.
  Logger* logger = DefaultLogger();
};

class HealthForwarder;

struct RunningServer {
  RunningServer();
  RunningServer(RunningServer&&) noexcept;
  RunningServer& operator=(RunningServer&&) noexcept;
  ~RunningServer();  // the health port closes before the server

  std::unique_ptr<grpc::Server> server;
  int port = 0;
  int health_port = 0;  // 0: no health port
  std::string address() const { return "127.0.0.1:" + std::to_string(port); }

  // Declared after `server`, destroyed before it.
  std::unique_ptr<HealthForwarder> health_forwarder;
  std::unique_ptr<grpc::Server> health_server;
};

// The Shutdown / Wait pair every server class offers: Shutdown runs its steps once, whichever
// thread calls first, and returns only once they are done (so a second caller never sees a half
// shut down server); Wait blocks until then. Thread-safe.
class ShutdownOnce {
 public:
  // Runs `steps` unless a Shutdown already ran them; returns once they have run.
  void Shutdown(const std::function<void()>& steps);
  void Wait();

 private:
  absl::Mutex mu_;
  absl::CondVar done_cv_;
  bool done_ ABSL_GUARDED_BY(mu_) = false;
};

// Builds and starts a server for `services` (not owned; must outlive the server).
absl::StatusOr<RunningServer> StartServer(const ServerOptions& options,
                                          const std::vector<grpc::Service*>& services);

// What a ready file says: the ports a started server bound, so that whoever started it (e.g.
// `dsmoe cluster up`) learns those it asked for as port 0. The file is lines of decimal
// ports, "<port>\n[<metrics port>\n[<health port>\n]]", a 0 for one it does not have; later
// lines are left out when they would all be 0 (so "<port>\n" alone is a server with neither).
struct ReadyPorts {
  int port = 0;          // the gRPC port
  int metrics_port = 0;  // the Prometheus /metrics port; 0: none
  int health_port = 0;   // the plain-text health port (--health-listen); 0: none
  int http_port = 0;     // the gateway's HTTP API (--http-listen); 0: none
  bool operator==(const ReadyPorts&) const = default;
};

// Writes `ports` to `path` atomically. For servers that are ready later than they start
// listening (StartServer writes it at once when options.ready_file is set).
absl::Status WriteReadyFile(const std::string& path, const ReadyPorts& ports);
// A ready file's text; INVALID_ARGUMENT if it is not one (the gRPC port missing or 0, a line
// that is not a port).
absl::StatusOr<ReadyPorts> ParseReadyFile(absl::string_view text);

// Blocks SIGTERM and SIGINT in the calling thread (call first in main, before any thread
// starts, so every thread inherits the mask), then returns.
void BlockShutdownSignals();
// Waits for SIGTERM or SIGINT (blocked by BlockShutdownSignals) and returns its number.
int WaitForShutdownSignal();

// "host:port,host:port" → addresses (empty items dropped), as the servers' flags take them.
std::vector<std::string> SplitAddresses(const std::string& list);

// A channel to a dsmoe service with `security` (TLS with the cluster CA and this process's
// client certificate, or plain text) and our message size limits.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address,
                                           const TransportSecurity& security,
                                           int max_message_bytes = 64 << 20);

}  // namespace dsmoe::rpc
