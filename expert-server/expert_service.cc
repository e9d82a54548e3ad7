#include "expert-server/expert_service.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "core/rpc/grpc_status.h"

namespace dsmoe {

ExpertService::ExpertService(std::unique_ptr<ModelWeights> weights,
                             const ExpertServiceOptions& options)
    : weights_(std::move(weights)),
      options_(options),
      pool_(options.threads),
      executor_(*weights_, pool_, options.max_assignments) {
  for (const LayerWeights& L : weights_->layers) {
    for (const MlpWeights& m : L.routed) num_held_ += m.loaded() ? 1 : 0;
  }
  if (options_.metrics != nullptr) {
    rpc::MetricsRegistry& r = *options_.metrics;
    auto& tokens = r.Counter(
        "dsmoe_expert_server_tokens_total",
        "Routed (token, expert) assignments computed by this expert server, per layer and expert");
    expert_tokens_.resize(weights_->layers.size());
    for (size_t l = 0; l < weights_->layers.size(); ++l) {
      const auto& routed = weights_->layers[l].routed;
      expert_tokens_[l].assign(routed.size(), nullptr);
      for (size_t e = 0; e < routed.size(); ++e) {
        if (routed[e].loaded())
          expert_tokens_[l][e] =
              &tokens.Add({{"layer", std::to_string(l)}, {"expert", std::to_string(e)}});
      }
    }
    tokens_ = &r.Counter("dsmoe_expert_server_rows_total",
                         "Hidden-state rows (tokens) received in ComputeExperts calls")
                   .Add({});
    compute_time_ = &r.Histogram("dsmoe_expert_server_compute_seconds",
                                 "Expert computation time of one ComputeExperts call")
                         .Add({}, rpc::RpcLatencyBuckets());
    requests_ = rpc::AddCodeCounters(r.Counter("dsmoe_expert_server_requests_total",
                                               "ComputeExperts calls served, by gRPC code"),
                                     {});
    r.Gauge("dsmoe_expert_server_experts_held", "Routed experts this expert server holds")
        .Add({})
        .Set(static_cast<double>(num_held_));
    counts_.assign(static_cast<size_t>(std::max<int64_t>(weights_->config().n_routed_experts, 0)),
                   0);
  }
}

grpc::Status ExpertService::ComputeExperts(grpc::ServerContext*,
                                           const internal::v1::ComputeExpertsRequest* request,
                                           internal::v1::ComputeExpertsResponse* response) {
  double seconds = 0;
  const absl::Status status = Compute(*request, response->mutable_output(), &seconds);
  response->set_compute_seconds(seconds);
  if (tokens_ != nullptr) rpc::CountCode(requests_, static_cast<int>(status.code()));
  return rpc::ToGrpc(status);
}

grpc::Status ExpertService::Echo(grpc::ServerContext*, const internal::v1::EchoMessage* request,
                                 internal::v1::EchoMessage* response) {
  response->set_payload(request->payload());
  return grpc::Status::OK;
}

absl::Status ExpertService::Compute(const internal::v1::ComputeExpertsRequest& r,
                                    std::string* output, double* compute_seconds) {
  const ModelConfig& c = weights_->config();
  const int64_t H = c.hidden_size, T = r.num_tokens();
  if (T == 0) return absl::InvalidArgumentError("num_tokens is 0");
  if (T > options_.max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(T, " tokens exceed this server's limit of ",
                                                     options_.max_tokens, " per request"));
  }
  if (r.layer() >= c.num_hidden_layers || !c.IsMoeLayer(r.layer())) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", r.layer(), " is not a MoE layer"));
  }
  if (r.hidden().size() != static_cast<size_t>(T * H) * sizeof(float)) {
    return absl::InvalidArgumentError(absl::StrCat("hidden holds ", r.hidden().size(), " bytes; ",
                                                   T, " tokens of hidden size ", H, " need ",
                                                   T * H * 4));
  }
  const int n = r.token_size();
  if (r.expert_size() != n || r.weight_size() != n) {
    return absl::InvalidArgumentError("token, expert and weight lists differ in length");
  }
  for (int i = 0; i < n; ++i) {
    if (!std::isfinite(r.weight(i)))
      return absl::InvalidArgumentError(absl::StrCat("weight ", i, " is not finite"));
    if (r.expert(i) >= static_cast<uint32_t>(c.n_routed_experts)) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert ", r.expert(i), " outside [0, ", c.n_routed_experts, ")"));
    }
    if (r.token(i) >= static_cast<uint32_t>(T)) {
      return absl::InvalidArgumentError(
          absl::StrCat("assignment ", i, " names token ", r.token(i), " of ", T));
    }
  }
  output->resize(static_cast<size_t>(T * H) * sizeof(float));
  std::lock_guard<std::mutex> lock(mu_);
  token_.assign(r.token().begin(), r.token().end());
  expert_.assign(r.expert().begin(), r.expert().end());
  // protobuf's repeated float is contiguous float storage.
  const ExpertAssignments a{token_.data(), expert_.data(), r.weight().data(), n};
  const auto start = std::chrono::steady_clock::now();
  const absl::Status status =
      executor_.RunAssignments(r.layer(), reinterpret_cast<const float*>(r.hidden().data()), T, a,
                               reinterpret_cast<float*>(output->data()));
  *compute_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (status.ok() && tokens_ != nullptr) {
    // What was computed, counted per expert first: one atomic add per expert in the request.
    // Every expert was checked as held by RunAssignments, so its counter exists.
    std::fill(counts_.begin(), counts_.end(), 0);
    for (int i = 0; i < n; ++i) ++counts_[expert_[i]];
    const auto& layer_counters = expert_tokens_[r.layer()];
    for (size_t e = 0; e < counts_.size(); ++e) {
      if (counts_[e] > 0 && layer_counters[e] != nullptr)
        layer_counters[e]->Increment(static_cast<double>(counts_[e]));
    }
    tokens_->Increment(static_cast<double>(T));
    compute_time_->Observe(*compute_seconds);
  }
  return status;
}

grpc::Status ExpertService::GetExperts(grpc::ServerContext*, const internal::v1::GetExpertsRequest*,
                                       internal::v1::GetExpertsResponse* response) {
  const ModelConfig& c = weights_->config();
  response->set_hidden_size(static_cast<uint32_t>(c.hidden_size));
  response->set_num_layers(static_cast<uint32_t>(c.num_hidden_layers));
  for (size_t l = 0; l < weights_->layers.size(); ++l) {
    const auto& routed = weights_->layers[l].routed;
    for (size_t e = 0; e < routed.size(); ++e) {
      if (!routed[e].loaded()) continue;
      response->add_layers(static_cast<uint32_t>(l));
      response->add_experts(static_cast<uint32_t>(e));
    }
  }
  return grpc::Status::OK;
}

}  // namespace dsmoe
