// dsmoe-attention-server's PlacementService (proto/dsmoe/internal/v1/placement.proto): what
// `dsmoe placement show|plan|apply` talks to. Handlers translate; the Rebalancer does the work.
//
// Thread-safe (the Rebalancer is).
#pragma once

#include "attention-server/rebalancer.h"
#include "dsmoe/internal/v1/placement.grpc.pb.h"

namespace dsmoe {

class PlacementService final : public internal::v1::PlacementService::Service {
 public:
  // `rebalancer` null: routed experts run in this process, and every call is
  // FAILED_PRECONDITION. REQUIRES: rebalancer outlives this.
  PlacementService(Rebalancer* rebalancer, const ModelConfig& config, double window_seconds)
      : rebalancer_(rebalancer), config_(config), window_seconds_(window_seconds) {}

  grpc::Status GetPlacement(grpc::ServerContext* context,
                            const internal::v1::GetPlacementRequest* request,
                            internal::v1::PlacementReport* response) override;
  grpc::Status PlanPlacement(grpc::ServerContext* context,
                             const internal::v1::PlanPlacementRequest* request,
                             internal::v1::PlacementPlan* response) override;
  grpc::Status ApplyPlacement(grpc::ServerContext* context,
                              const internal::v1::ApplyPlacementRequest* request,
                              internal::v1::ApplyPlacementResponse* response) override;

 private:
  grpc::Status NoRebalancer() const;

  Rebalancer* rebalancer_;
  const ModelConfig& config_;
  double window_seconds_;
};

}  // namespace dsmoe
