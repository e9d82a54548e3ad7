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
#include "dsmoe/internal/v1/attention.grpc.pb.h"
#include "expert-server/client/expert_server_pool.h"

namespace dsmoe {

class AttentionService final : public internal::v1::AttentionService::WithCallbackMethod_Generate<
                                   internal::v1::AttentionService::Service> {
 public:
  // REQUIRES: scheduler and expert_servers (null: the routed experts run here) outlive this.
  AttentionService(Scheduler& scheduler, const GenerationConfig& generation,
                   const ExpertServerPool* expert_servers = nullptr);

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
  Scheduler& scheduler_;
  const GenerationConfig& generation_;
  const ExpertServerPool* expert_servers_;
};

}  // namespace dsmoe
