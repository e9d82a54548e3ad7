#include "expert-server/expert_service.h"

#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/grpc_status.h"

namespace dsmoe {

ExpertService::ExpertService(std::unique_ptr<ExpertStore> store,
                             const ExpertServiceOptions& options)
    : store_(std::move(store)), options_(options), held_(store_->InitiallyHeld()) {
  target_ = held_;
  const ModelConfig& c = store_->config();
  if (options_.metrics != nullptr) {
    rpc::MetricsRegistry& r = *options_.metrics;
    tokens_family_ = &r.Counter(
        "dsmoe_expert_server_tokens_total",
        "Routed (token, expert) assignments computed by this expert server, per layer and expert");
    expert_tokens_.assign(c.num_hidden_layers, std::vector<prometheus::Counter*>(
                                                   std::max<int64_t>(c.n_routed_experts, 0)));
    absl::MutexLock lock(&mu_);
    for (const auto& [l, e] : held_) CountHeld(l, e);
    tokens_ = &r.Counter("dsmoe_expert_server_rows_total",
                         "Hidden-state rows (tokens) received in ComputeExperts calls")
                   .Add({});
    compute_time_ = &r.Histogram("dsmoe_expert_server_compute_seconds",
                                 "Expert computation time of one ComputeExperts call")
                         .Add({}, rpc::RpcLatencyBuckets());
    requests_ = rpc::AddCodeCounters(r.Counter("dsmoe_expert_server_requests_total",
                                               "ComputeExperts calls served, by gRPC code"),
                                     {});
    held_gauge_ =
        &r.Gauge("dsmoe_expert_server_experts_held", "Routed experts this expert server holds")
             .Add({});
    held_gauge_->Set(static_cast<double>(held_.size()));
    version_gauge_ = &r.Gauge("dsmoe_expert_server_placement_version",
                              "Version of the latest placement this expert server serves (0: the "
                              "one it started with)")
                          .Add({});
    counts_.assign(static_cast<size_t>(std::max<int64_t>(c.n_routed_experts, 0)), 0);
  }
}

ExpertService::~ExpertService() {
  if (loader_.joinable()) loader_.join();
}

void ExpertService::CountHeld(int64_t l, int64_t e) {
  if (tokens_family_ == nullptr || expert_tokens_[l][e] != nullptr) return;
  expert_tokens_[l][e] =
      &tokens_family_->Add({{"layer", std::to_string(l)}, {"expert", std::to_string(e)}});
}

int64_t ExpertService::num_experts_held() const {
  absl::MutexLock lock(&state_mu_);
  return static_cast<int64_t>(held_.size());
}

absl::Status ExpertService::CheckExperts(const ExpertSet& experts) const {
  const ModelConfig& c = store_->config();
  for (const auto& [l, e] : experts) {
    if (l >= c.num_hidden_layers || !c.IsMoeLayer(l))
      return absl::InvalidArgumentError(absl::StrCat("layer ", l, " is not a MoE layer"));
    if (e >= c.n_routed_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert ", e, " of layer ", l, " outside [0, ", c.n_routed_experts, ")"));
    }
  }
  return absl::OkStatus();
}

grpc::Status ExpertService::SetPlacement(grpc::ServerContext*,
                                         const internal::v1::SetPlacementRequest* request,
                                         internal::v1::SetPlacementResponse* response) {
  if (request->layers_size() != request->experts_size()) {
    return rpc::ToGrpc(absl::InvalidArgumentError("layers and experts differ in length"));
  }
  ExpertSet want;
  for (int i = 0; i < request->layers_size(); ++i)
    want.insert({request->layers(i), request->experts(i)});
  if (auto s = CheckExperts(want); !s.ok()) return rpc::ToGrpc(s);
  PlacementChange change;
  {
    absl::MutexLock lock(&state_mu_);
    if (state_ == internal::v1::PLACEMENT_STATE_LOADING) {
      if (want == target_ && request->version() == version_) {  // a retry of the same change
        response->set_state(state_);
        return grpc::Status::OK;
      }
      return rpc::ToGrpc(absl::FailedPreconditionError(absl::StrCat(
          "placement version ", version_, " is still loading; try again once it serves")));
    }
    std::set_difference(want.begin(), want.end(), held_.begin(), held_.end(),
                        std::inserter(change.to_load, change.to_load.end()));
    std::set_difference(held_.begin(), held_.end(), want.begin(), want.end(),
                        std::inserter(change.to_drop, change.to_drop.end()));
    change.target = want;
    target_ = want;
    version_ = request->version();
    error_.clear();
    response->set_num_loading(static_cast<uint32_t>(change.to_load.size()));
    response->set_num_dropping(static_cast<uint32_t>(change.to_drop.size()));
    if (!store_->PrepareIsSlow(change)) {  // e.g. only drops on the CPU: a swap of views
      absl::StatusOr<ExpertStore::Commit> commit = store_->Prepare(change);
      if (!commit.ok()) return rpc::ToGrpc(commit.status());
      ServeTargetLocked(std::move(*commit), change.to_load);
      response->set_state(state_);
      options_.logger->Log(
          LogLevel::kInfo,
          absl::StrCat("expert server: placement ", version_, " serves ", held_.size(),
                       " experts (dropped ", change.to_drop.size(), ")"));
      return grpc::Status::OK;
    }
    state_ = internal::v1::PLACEMENT_STATE_LOADING;
    response->set_state(state_);
  }
  // The previous loader has finished (state was not LOADING): join it before starting anew.
  if (loader_.joinable()) loader_.join();
  loader_ = std::thread([this, v = request->version(), change = std::move(change)]() mutable {
    Load(v, std::move(change));
  });
  return grpc::Status::OK;
}

void ExpertService::Load(uint64_t version, PlacementChange change) {
  // Below the serving threads: loading competes with computing for the same cores, and a
  // rebalance must not stall the tokens in flight.
  setpriority(PRIO_PROCESS, static_cast<id_t>(syscall(SYS_gettid)), 10);
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<ExpertStore::Commit> commit = store_->Prepare(change);
  absl::MutexLock lock(&state_mu_);
  if (!commit.ok()) {
    state_ = internal::v1::PLACEMENT_STATE_FAILED;
    error_ = std::string(commit.status().message());
    options_.logger->Log(LogLevel::kError, absl::StrCat("expert server: placement ", version,
                                                        " failed to load: ", error_));
    return;
  }
  ServeTargetLocked(std::move(*commit), change.to_load);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  options_.logger->Log(
      LogLevel::kInfo,
      absl::StrFormat("expert server: placement %u serves %u experts (loaded %u in %.3f s, "
                      "dropped %u)",
                      version, held_.size(), change.to_load.size(), seconds,
                      change.to_drop.size()));
}

void ExpertService::ServeTargetLocked(ExpertStore::Commit commit, const ExpertSet& to_load) {
  {
    absl::MutexLock compute(&mu_);
    commit();
    for (const auto& [l, e] : to_load) CountHeld(l, e);
  }
  commit = nullptr;  // what the change replaced is freed here, outside the compute lock
  held_ = target_;
  state_ = internal::v1::PLACEMENT_STATE_SERVING;
  if (held_gauge_ != nullptr) {
    held_gauge_->Set(static_cast<double>(held_.size()));
    version_gauge_->Set(static_cast<double>(version_));
  }
}

namespace {

// The call's deadline on the steady clock, at most `cap` away (a call without one gets `cap`).
ExpertStore::Deadline SteadyDeadline(const grpc::ServerContext& context,
                                     std::chrono::milliseconds cap) {
  const auto now = std::chrono::steady_clock::now();
  const auto capped = now + cap;
  const auto left = context.deadline() - std::chrono::system_clock::now();
  return left < cap ? now + std::chrono::duration_cast<std::chrono::steady_clock::duration>(left)
                    : capped;
}

}  // namespace

grpc::Status ExpertService::ComputeExperts(grpc::ServerContext* context,
                                           const internal::v1::ComputeExpertsRequest* request,
                                           internal::v1::ComputeExpertsResponse* response) {
  ComputeCall call;
  call.layer = request->layer();
  call.num_tokens = request->num_tokens();
  call.hidden = request->hidden().empty()
                    ? nullptr
                    : reinterpret_cast<const float*>(request->hidden().data());
  call.hidden_bytes = request->hidden().size();
  // protobuf's repeated scalars are contiguous storage.
  call.token = {request->token().data(), static_cast<size_t>(request->token_size())};
  call.expert = {request->expert().data(), static_cast<size_t>(request->expert_size())};
  call.weight = {request->weight().data(), static_cast<size_t>(request->weight_size())};
  call.nccl_channel = request->nccl_channel();
  std::string* output = response->mutable_output();
  double seconds = 0;
  const absl::Status status = Compute(
      call,
      [&](int64_t T) {
        output->resize(static_cast<size_t>(T * hidden_size()) * sizeof(float));
        return reinterpret_cast<float*>(output->data());
      },
      &seconds, SteadyDeadline(*context, std::chrono::seconds(30)));
  response->set_compute_seconds(seconds);
  return rpc::ToGrpc(status);
}

grpc::Status ExpertService::Echo(grpc::ServerContext*, const internal::v1::EchoMessage* request,
                                 internal::v1::EchoMessage* response) {
  response->set_payload(request->payload());
  return grpc::Status::OK;
}

grpc::Status ExpertService::OpenNcclChannel(grpc::ServerContext* context,
                                            const internal::v1::OpenNcclChannelRequest* request,
                                            internal::v1::OpenNcclChannelResponse* response) {
  constexpr uint32_t kDefaultMs = 30000, kMaxMs = 120000;
  constexpr size_t kUniqueIdBytes = 128;  // NCCL_UNIQUE_ID_BYTES (nccl.h: not in CPU builds)
  if (request->nccl_unique_id().size() != kUniqueIdBytes) {
    return rpc::ToGrpc(absl::InvalidArgumentError(absl::StrCat(
        "nccl_unique_id has ", request->nccl_unique_id().size(), " bytes, not ", kUniqueIdBytes)));
  }
  const uint32_t ms = request->timeout_ms() == 0 ? kDefaultMs : request->timeout_ms();
  if (ms > kMaxMs) {
    return rpc::ToGrpc(absl::InvalidArgumentError(
        absl::StrCat("timeout_ms ", ms, " is above this server's limit of ", kMaxMs)));
  }
  absl::StatusOr<uint64_t> channel = store_->OpenChannel(
      request->nccl_unique_id(), SteadyDeadline(*context, std::chrono::milliseconds(ms)));
  if (!channel.ok()) return rpc::ToGrpc(channel.status());
  response->set_channel(*channel);
  options_.logger->Log(LogLevel::kInfo,
                       absl::StrCat("expert server: NCCL channel ", *channel, " open"));
  return grpc::Status::OK;
}

absl::Status ExpertService::Compute(const ComputeCall& call, OutputFn output,
                                    double* compute_seconds, ExpertStore::Deadline deadline) {
  *compute_seconds = 0;
  absl::Status status = Validate(call);
  if (status.ok()) status = Run(call, output, compute_seconds, deadline);
  if (!status.ok() && call.nccl_channel != 0) {
    // The two sides are out of step now; the caller closes its side on any error.
    store_->CloseChannel(call.nccl_channel);
  }
  if (tokens_ != nullptr) rpc::CountCode(requests_, static_cast<int>(status.code()));
  return status;
}

absl::Status ExpertService::Validate(const ComputeCall& r) const {
  const ModelConfig& c = store_->config();
  const int64_t H = c.hidden_size, T = r.num_tokens;
  if (T <= 0) return absl::InvalidArgumentError("num_tokens is 0");
  if (T > store_->options().max_tokens) {
    return absl::ResourceExhaustedError(absl::StrCat(T, " tokens exceed this server's limit of ",
                                                     store_->options().max_tokens, " per request"));
  }
  if (r.layer >= c.num_hidden_layers || !c.IsMoeLayer(r.layer)) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", r.layer, " is not a MoE layer"));
  }
  const bool over_channel = r.nccl_channel != 0;
  if (over_channel && r.hidden_bytes != 0) {
    return absl::InvalidArgumentError("hidden must be empty when nccl_channel carries it");
  }
  if (!over_channel && r.hidden_bytes != static_cast<size_t>(T * H) * sizeof(float)) {
    return absl::InvalidArgumentError(absl::StrCat("hidden holds ", r.hidden_bytes, " bytes; ", T,
                                                   " tokens of hidden size ", H, " need ",
                                                   T * H * 4));
  }
  const size_t n = r.token.size();
  if (r.expert.size() != n || r.weight.size() != n) {
    return absl::InvalidArgumentError("token, expert and weight lists differ in length");
  }
  if (static_cast<int64_t>(n) > store_->max_assignments()) {
    return absl::ResourceExhaustedError(absl::StrCat(n,
                                                     " assignments exceed this server's limit of ",
                                                     store_->max_assignments(), " per request"));
  }
  for (size_t i = 0; i < n; ++i) {
    if (!std::isfinite(r.weight[i]))
      return absl::InvalidArgumentError(absl::StrCat("weight ", i, " is not finite"));
    if (r.expert[i] >= static_cast<uint32_t>(c.n_routed_experts)) {
      return absl::InvalidArgumentError(
          absl::StrCat("expert ", r.expert[i], " outside [0, ", c.n_routed_experts, ")"));
    }
    if (r.token[i] >= static_cast<uint32_t>(T)) {
      return absl::InvalidArgumentError(
          absl::StrCat("assignment ", i, " names token ", r.token[i], " of ", T));
    }
  }
  return absl::OkStatus();
}

absl::Status ExpertService::Run(const ComputeCall& r, OutputFn output, double* compute_seconds,
                                ExpertStore::Deadline deadline) {
  const int64_t T = r.num_tokens, n = static_cast<int64_t>(r.token.size());
  const bool over_channel = r.nccl_channel != 0;
  float* out = over_channel ? nullptr : output(T);
  absl::MutexLock lock(&mu_);
  token_.assign(r.token.begin(), r.token.end());
  expert_.assign(r.expert.begin(), r.expert.end());
  const ExpertAssignments a{token_.data(), expert_.data(), r.weight.data(), n};
  const auto start = std::chrono::steady_clock::now();
  const absl::Status status =
      over_channel ? store_->RunAssignmentsOverChannel(r.nccl_channel, r.layer, T, a, deadline)
                   : store_->RunAssignments(r.layer, r.hidden, T, a, out);
  *compute_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (status.ok() && tokens_ != nullptr) {
    // What was computed, counted per expert first: one atomic add per expert in the request.
    // Every expert was checked as held by RunAssignments, so its counter exists.
    std::fill(counts_.begin(), counts_.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++counts_[expert_[i]];
    const auto& layer_counters = expert_tokens_[r.layer];
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
  const ModelConfig& c = store_->config();
  response->set_hidden_size(static_cast<uint32_t>(c.hidden_size));
  response->set_num_layers(static_cast<uint32_t>(c.num_hidden_layers));
  absl::MutexLock lock(&state_mu_);
  for (const auto& [l, e] : held_) {
    response->add_layers(static_cast<uint32_t>(l));
    response->add_experts(static_cast<uint32_t>(e));
  }
  response->set_placement_version(version_);
  response->set_placement_state(state_);
  response->set_placement_error(error_);
  response->set_data_port(data_port_.load());
  return grpc::Status::OK;
}

}  // namespace dsmoe
