// dsmoe-attention-server's gRPC handlers. They only translate: requests become Scheduler
// submissions; the scheduler's loop thread does all model work.
//
// Generate uses gRPC's callback API: each stream is a reactor that the scheduler's sink feeds
// (a token arrives -> a write starts, one in flight at a time, the tokens that arrive meanwhile
// go out together in the next one), so no thread waits per stream. A cancelled call cancels its
// sequence, which frees its KV-cache slot before the next step. GetLoad and ComputeLogits stay
// synchronous (short, or a forward pass the caller waits for anyway).
//
// Thread-safe (reactions run on gRPC's threads; the scheduler is thread-safe).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "attention-server/scheduler.h"
#include "core/rpc/transport_security.h"
#include "dsmoe/internal/v1/attention.grpc.pb.h"
#include "dsmoe/internal/v1/expert.grpc.pb.h"

namespace dsmoe {

// The expert servers this attention server dispatches to, for GetServingInfo.
struct ExpertServerList {
  std::vector<std::string> addresses;  // in placement order; empty: routed experts run here
  rpc::TransportSecurity security;     // how they are reached
};

class AttentionService final : public internal::v1::AttentionService::WithCallbackMethod_Generate<
                                   internal::v1::AttentionService::Service> {
 public:
  // REQUIRES: scheduler outlives this.
  AttentionService(Scheduler& scheduler, const GenerationConfig& generation,
                   const ExpertServerList& expert_servers = {});

  grpc::ServerWriteReactor<internal::v1::AttentionGenerateResponse>* Generate(
      grpc::CallbackServerContext* context,
      const internal::v1::AttentionGenerateRequest* request) override;
  grpc::Status GetLoad(grpc::ServerContext* context, const internal::v1::GetLoadRequest* request,
                       internal::v1::LoadReport* response) override;
  grpc::Status ComputeLogits(grpc::ServerContext* context,
                             const internal::v1::ComputeLogitsRequest* request,
                             internal::v1::ComputeLogitsResponse* response) override;
  // Asks each expert server what it holds (each within 5 s and the caller's deadline).
  grpc::Status GetServingInfo(grpc::ServerContext* context,
                              const internal::v1::GetServingInfoRequest* request,
                              internal::v1::ServingInfo* response) override;

 private:
  struct ExpertServer {
    std::string address;
    std::unique_ptr<internal::v1::ExpertService::Stub> stub;
  };
  Scheduler& scheduler_;
  const GenerationConfig& generation_;
  std::vector<ExpertServer> expert_servers_;
};

}  // namespace dsmoe
