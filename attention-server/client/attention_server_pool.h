// The gateway's view of its attention servers: one channel each, their health, and the relay of
// one Generate call with its retries.
//
// Pick: serving servers first; one that is alive but not serving (some routed expert has no live
// server) can still run the requests that do not need those experts, so it comes next; a down
// one never. Among equals, the fewest requests in flight.
//
// Retry: a request that has produced no token yet can run anywhere with the same result
// (sampling is seeded per request), so if its server fails with UNAVAILABLE it is tried on
// another one. Once tokens went out, a retry would repeat or contradict them: the call fails,
// saying how many were delivered.
//
// Everything is asynchronous (a gRPC ClientReadReactor per attempt): no thread waits for a
// stream, and the observer hears the call on gRPC's threads.
//
// Thread-safe.
#pragma once

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <functional>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/health_checker.h"
#include "core/rpc/transport_security.h"
#include "core/util/status.h"
#include "dsmoe/internal/v1/attention.grpc.pb.h"

namespace dsmoe {

// Hears one relayed Generate. Calls never overlap; OnEnd is the last one. Runs on gRPC's
// threads: must not block.
class GenerateObserver {
 public:
  virtual ~GenerateObserver() = default;
  // One message from the attention server. Returning false stops the call (a stop string, or
  // the client went away): the upstream call is cancelled and OnEnd follows with OK.
  virtual bool OnMessage(const internal::v1::AttentionGenerateResponse& message) = 0;
  // The call ended: OK after the last message (or a stop), else why, naming the server(s).
  virtual void OnEnd(const absl::Status& status) = 0;
};

class AttentionServerPool {
 public:
  // `health` (may be null: every server counts as serving) checks the same servers, target i
  // being addresses[i]; not owned, must outlive the pool. Its OnChange should call
  // OnHealthChange.
  AttentionServerPool(const std::vector<std::string>& addresses,
                      const rpc::TransportSecurity& security, rpc::HealthChecker* health);
  ~AttentionServerPool();
  AttentionServerPool(const AttentionServerPool&) = delete;
  AttentionServerPool& operator=(const AttentionServerPool&) = delete;

  // One request being relayed.
  class Call {
   public:
    virtual ~Call() = default;
    // Ends the request: the upstream call is cancelled, and OnEnd follows with CANCELLED
    // unless it had already come. Any thread, any number of times.
    virtual void Cancel() = 0;
  };
  // Starts `request` on the best server. Each attempt's call inherits `parent`'s deadline and
  // is cancelled with it. REQUIRES: parent and observer outlive the call (until OnEnd).
  // OnEnd may come before this returns (no server to try).
  std::shared_ptr<Call> Generate(const grpc::CallbackServerContext& parent,
                                 internal::v1::AttentionGenerateRequest request,
                                 GenerateObserver* observer);

  // Asks the best attention server (the next one if it is unavailable) what GetModelInfo
  // reports of the serving side: the expert servers and what they hold. `done` runs once, on
  // gRPC's threads, or before this returns when no server can be asked. Each ask ends within
  // 10 s and `parent`'s deadline. REQUIRES: parent outlives the call (until `done`).
  using ServingInfoDone = std::function<void(absl::StatusOr<internal::v1::ServingInfo>)>;
  void GetServingInfo(const grpc::CallbackServerContext& parent, ServingInfoDone done);

  // When server `index` is declared down, its calls in flight are cancelled (a frozen process
  // keeps its connections open; its streams would otherwise hang until their deadlines), so
  // the requests without tokens yet are retried elsewhere.
  void OnHealthChange(int index, rpc::TargetHealth now);

  int num_servers() const { return static_cast<int>(servers_.size()); }
  const std::string& address(int index) const { return servers_[index]->address; }

 private:
  class Relay;
  class Attempt;
  struct InfoCall;
  void AskNext(std::shared_ptr<InfoCall> call);
  struct Server {
    int index = 0;
    std::string address;
    std::unique_ptr<internal::v1::AttentionService::Stub> stub;
    std::atomic<int64_t> in_flight{0};
    absl::Mutex mu;
    std::set<Attempt*> attempts ABSL_GUARDED_BY(mu);  // in flight
  };

  // The server to try next among those not yet `tried`; null if none is left.
  Server* Pick(const std::vector<bool>& tried) const;
  rpc::TargetHealth Health(int index) const;
  // Why the server is not serving, for messages.
  std::string Reason(int index) const;
  // Why no server could be picked at all.
  std::string NoneAvailable() const;

  std::vector<std::unique_ptr<Server>> servers_;
  rpc::HealthChecker* health_;
};

}  // namespace dsmoe
