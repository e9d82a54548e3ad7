// The attention side of the expert data plane (expert-server/data_plane_server.h): one
// dispatcher lane's connections to every expert server's data port, over which ComputeExperts
// calls travel as lean frames (expert-server/data_plane_frame.h) instead of gRPC messages. gRPC
// stays the control plane and the fallback: a call that cannot start here goes by gRPC, and a
// call that fails in transport reports UNAVAILABLE so the dispatcher fails over.
//
// All I/O runs on the caller's thread (an Asio io_context driven from Start and WaitAll; no
// threads of its own, no thread hops). Buffers grow to the largest call and are then reused:
// no allocation per call once warm.
//
// Thread-compatible, except SetEndpoint and HasEndpoint, which are thread-safe (the pool's
// health-check thread calls them). Start, WaitAll and result belong to one runner thread.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "core/rpc/transport_security.h"

namespace dsmoe {

// One call's inputs; they must stay valid until WaitAll returns.
struct LinkCall {
  uint32_t layer = 0;
  const float* x = nullptr;         // source rows [*, H]
  std::span<const int32_t> rows;    // rows of x to send, in order (the call's tokens)
  std::span<const int32_t> token;   // per assignment: index into rows
  std::span<const int32_t> expert;  // per assignment: routed expert of the layer
  std::span<const float> weight;
};

class ExpertLinks {
 public:
  // No endpoints yet: every server's calls go by gRPC until SetEndpoint names its data port.
  ExpertLinks(int num_servers, const rpc::TransportSecurity& security, int64_t hidden_size);
  ~ExpertLinks();
  ExpertLinks(const ExpertLinks&) = delete;
  ExpertLinks& operator=(const ExpertLinks&) = delete;

  // Where server s's data plane listens: the host of its gRPC address and the port GetExperts
  // reports (0: none, its calls go by gRPC). A change closes the old connection (at the next
  // Start). Thread-safe.
  void SetEndpoint(int s, const std::string& host, int port);
  bool HasEndpoint(int s) const;  // thread-safe

  // Starts a call to s: connects and handshakes first if not connected (bounded by
  // `deadline`), then puts the request on the wire before returning, so that the server
  // computes while the caller does other work. An error means the call did not start (the
  // caller sends it by gRPC instead); after a failed connect, Start fails at once for 5 s
  // before trying again. REQUIRES: no call to s in flight (WaitAll since the last).
  absl::Status Start(int s, const LinkCall& call, std::chrono::steady_clock::time_point deadline);

  // Drives the I/O of every started call until each has its reply or `deadline` has passed:
  // missing ones get DEADLINE_EXCEEDED and their connection is closed (the next Start
  // reconnects). A connection that fails or that the server closes: UNAVAILABLE, naming the
  // server's address. Error replies of the server carry its code and message.
  void WaitAll(std::chrono::steady_clock::time_point deadline);

  struct Result {
    absl::Status status;
    const float* output = nullptr;  // [rows, H] when OK; valid until the next Start to s
    double compute_seconds = 0;     // the server's
    size_t sent_bytes = 0, received_bytes = 0;  // frames of this call
  };
  // The latest call to s, once WaitAll has returned.
  const Result& result(int s) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsmoe
