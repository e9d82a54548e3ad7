// dsmoe-attention-server's gRPC handlers. They only translate: requests become Scheduler
// submissions, and each call's thread drains its sequence's tokens into the stream. The
// scheduler's loop thread does all model work.
//
// Thread-safe (handlers run on gRPC's threads; the scheduler is thread-safe).
#pragma once

#include "attention-server/scheduler.h"
#include "dsmoe/internal/v1/attention.grpc.pb.h"

namespace dsmoe {

class AttentionService final : public internal::v1::AttentionService::Service {
 public:
  // REQUIRES: scheduler outlives this.
  AttentionService(Scheduler& scheduler, const GenerationConfig& generation)
      : scheduler_(scheduler), generation_(generation) {}

  grpc::Status Generate(
      grpc::ServerContext* context, const internal::v1::AttentionGenerateRequest* request,
      grpc::ServerWriter<internal::v1::AttentionGenerateResponse>* writer) override;
  grpc::Status GetLoad(grpc::ServerContext* context, const internal::v1::GetLoadRequest* request,
                       internal::v1::LoadReport* response) override;
  grpc::Status ComputeLogits(grpc::ServerContext* context,
                             const internal::v1::ComputeLogitsRequest* request,
                             internal::v1::ComputeLogitsResponse* response) override;

 private:
  Scheduler& scheduler_;
  const GenerationConfig& generation_;
};

}  // namespace dsmoe
