#include "attention-server/placement_service.h"

#include <set>

#include "core/rpc/grpc_status.h"

namespace dsmoe {

grpc::Status PlacementService::NoRebalancer() const {
  return rpc::ToGrpc(absl::FailedPreconditionError(
      "this attention server computes routed experts itself: there is no placement to change"));
}

grpc::Status PlacementService::GetPlacement(grpc::ServerContext*,
                                            const internal::v1::GetPlacementRequest*,
                                            internal::v1::PlacementReport* response) {
  if (rebalancer_ == nullptr) return NoRebalancer();
  const auto placement = rebalancer_->placement();
  const auto loads = rebalancer_->WindowLoads();
  response->set_version(placement->version());
  response->set_placement_json(placement->ToJson());
  response->set_window_seconds(window_seconds_);
  response->set_automatic(rebalancer_->automatic());
  for (int64_t l = 0; l < static_cast<int64_t>(loads.size()); ++l) {
    if (!config_.IsMoeLayer(l) || loads[l].empty()) continue;
    internal::v1::LayerLoad* layer = response->add_layers();
    layer->set_layer(static_cast<uint32_t>(l));
    for (double x : loads[l]) layer->add_expert_tokens(static_cast<uint64_t>(x));
    const std::vector<double> server = router::ServerLoads(*placement, l, loads[l]);
    for (double x : server) layer->add_server_load(x);
    layer->set_imbalance(router::Imbalance(server));
  }
  const RebalanceStatusReport st = rebalancer_->status();
  auto* s = response->mutable_status();
  s->set_succeeded(st.succeeded);
  s->set_failed(st.failed);
  s->set_last_duration_seconds(st.last_duration_seconds);
  s->set_last_success_unix_seconds(st.last_success_unix_seconds);
  s->set_last_error(st.last_error);
  return grpc::Status::OK;
}

grpc::Status PlacementService::PlanPlacement(grpc::ServerContext*,
                                             const internal::v1::PlanPlacementRequest*,
                                             internal::v1::PlacementPlan* response) {
  if (rebalancer_ == nullptr) return NoRebalancer();
  const auto current = rebalancer_->placement();
  const auto loads = rebalancer_->WindowLoads();
  auto plan = router::PlanPlacement(*current, loads, rebalancer_->options().planner);
  if (!plan.ok()) return rpc::ToGrpc(plan.status());
  response->set_placement_json(plan->ToJson());
  response->set_version(plan->version());
  const std::vector<double> before = rebalancer_->Imbalances(*current, loads);
  const std::vector<double> after = rebalancer_->Imbalances(*plan, loads);
  for (int64_t l = 0; l < current->num_layers(); ++l) {
    if (current->num_experts(l) > 0) response->add_layers(static_cast<uint32_t>(l));
  }
  for (double x : before) response->add_imbalance_before(x);
  for (double x : after) response->add_imbalance_after(x);
  uint32_t to_load = 0;
  for (int s = 0; s < current->num_servers(); ++s) {
    const auto held = current->ExpertsOf(s);
    const std::set<std::pair<int64_t, int64_t>> have(held.begin(), held.end());
    for (const auto& le : plan->ExpertsOf(s)) to_load += have.count(le) ? 0 : 1;
  }
  response->set_experts_to_load(to_load);
  const auto [fewest, most] = plan->CopiesRange();
  response->set_min_copies(static_cast<uint32_t>(fewest));
  response->set_max_copies(static_cast<uint32_t>(most));
  response->set_copies_floor(static_cast<uint32_t>(rebalancer_->options().planner.min_copies));
  return grpc::Status::OK;
}

grpc::Status PlacementService::ApplyPlacement(grpc::ServerContext*,
                                              const internal::v1::ApplyPlacementRequest* request,
                                              internal::v1::ApplyPlacementResponse* response) {
  if (rebalancer_ == nullptr) return NoRebalancer();
  std::optional<router::Placement> target;
  if (!request->placement_json().empty()) {
    auto p = router::Placement::FromJson(request->placement_json(), config_, "placement_json");
    if (!p.ok()) return rpc::ToGrpc(p.status());
    target.emplace(std::move(*p));
  }
  auto outcome =
      rebalancer_->Apply(std::move(target), request->keep_old_experts(), request->force());
  if (!outcome.ok()) return rpc::ToGrpc(outcome.status());
  response->set_version(outcome->version);
  response->set_switched(outcome->switched);
  response->set_duration_seconds(outcome->duration_seconds);
  response->set_load_seconds(outcome->load_seconds);
  response->set_switch_seconds(outcome->switch_seconds);
  response->set_experts_loaded(static_cast<uint32_t>(outcome->experts_loaded));
  response->set_experts_dropped(static_cast<uint32_t>(outcome->experts_dropped));
  for (int64_t l : outcome->layers) response->add_layers(static_cast<uint32_t>(l));
  for (double x : outcome->imbalance_before) response->add_imbalance_before(x);
  for (double x : outcome->imbalance_after) response->add_imbalance_after(x);
  return grpc::Status::OK;
}

}  // namespace dsmoe
