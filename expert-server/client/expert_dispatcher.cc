#include "expert-server/client/expert_dispatcher.h"

#include <cstring>
#include <set>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/address.h"
#include "core/rpc/grpc_status.h"

namespace dsmoe {

ExpertDispatcher::ExpertDispatcher(const ModelConfig& config, const router::Placement& placement,
                                   ExpertServerPool& pool, const ExpertDispatcherOptions& options)
    : config_(config),
      placement_(std::make_shared<const router::Placement>(placement)),
      pool_(pool),
      options_(options),
      planner_(*placement_) {
  const int lanes = options_.side_channel != nullptr ? 1 : std::max(options_.lanes, 1);
  for (int i = 0; i < lanes; ++i) {
    lanes_.push_back(std::make_unique<Lane>());
    Lane& lane = *lanes_.back();
    lane.calls.resize(pool_.num_servers());
    lane.link_failing.assign(pool_.num_servers(), false);
    if (options_.data_plane && options_.side_channel == nullptr) {
      lane.links =
          std::make_unique<ExpertLinks>(pool_.num_servers(), pool_.security(), config.hidden_size);
    }
  }
  if (options_.metrics != nullptr) {
    for (int s = 0; s < pool_.num_servers(); ++s) {
      metrics_.push_back(std::make_unique<DispatchMetrics>(*options_.metrics, s));
    }
  }
}

DispatchMetrics::DispatchMetrics(rpc::MetricsRegistry& r, int server) {
  const prometheus::Labels labels = {{"expert_server", std::to_string(server)}};
  round_trip =
      &r.Histogram("dsmoe_dispatch_round_trip_seconds",
                   "Round trip of one ComputeExperts call to an expert server (send to reply)")
           .Add(labels, rpc::RpcLatencyBuckets());
  sent_bytes = &r.Counter("dsmoe_dispatch_sent_bytes_total",
                          "Bytes of ComputeExperts requests sent (protobuf size)")
                    .Add(labels);
  received_bytes = &r.Counter("dsmoe_dispatch_received_bytes_total",
                              "Bytes of ComputeExperts replies received (protobuf size)")
                        .Add(labels);
  assignments = &r.Counter("dsmoe_dispatch_assignments_total",
                           "Routed (token, expert) assignments dispatched to an expert server")
                     .Add(labels);
  tokens = &r.Counter("dsmoe_dispatch_tokens_total",
                      "Hidden-state rows (tokens) sent to an expert server")
                .Add(labels);
  data_plane_calls =
      &r.Counter("dsmoe_dispatch_data_plane_calls_total",
                 "ComputeExperts calls that went over the expert server's data plane (the rest: "
                 "gRPC)")
           .Add(labels);
  calls = rpc::AddCodeCounters(
      r.Counter("dsmoe_dispatch_calls_total",
                "ComputeExperts calls to an expert server, by gRPC code (failures: code != OK)"),
      labels);
}

absl::Status ExpertDispatcher::Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                                   const float* weights, int64_t k, float* out) {
  DSMOE_RETURN_IF_ERROR(Start(0, layer, x, T, experts, weights, k));
  return Finish(0, out);
}

absl::Status ExpertDispatcher::Start(int lane_index, int64_t layer, const float* x, int64_t T,
                                     const int32_t* experts, const float* weights, int64_t k) {
  if (lane_index < 0 || lane_index >= lanes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dispatch lane ", lane_index, " outside [0, ", lanes(), ")"));
  }
  Lane& lane = *lanes_[lane_index];
  lane.layer = layer;
  lane.num_tokens = T;
  lane.k = k;
  lane.x = x;
  lane.experts = experts;
  lane.weights = weights;
  // The pool's verdict: its health checks (current to one period), or the rest after a failure.
  for (int s = 0; s < pool_.num_servers(); ++s) planner_.SetAvailable(s, pool_.available(s));
  return Send(lane);
}

absl::Status ExpertDispatcher::Send(Lane& lane) {
  // Planned aside first: if no server is left for some expert, the previous attempt's work
  // stays in place to explain which calls failed.
  DSMOE_RETURN_IF_ERROR(planner_.Plan(lane.layer, lane.num_tokens, lane.k, lane.experts,
                                      lane.weights, &lane.planned));
  lane.work.swap(lane.planned);
  {
    absl::MutexLock lock(&lane.mu);
    lane.outstanding = 0;
  }
  lane.deadline = std::chrono::steady_clock::now() + options_.deadline;
  for (size_t s = 0; s < lane.calls.size(); ++s) {
    Call& call = lane.calls[s];
    const router::ServerWork& w = lane.work[s];
    call.active = !w.empty();
    call.over_data_plane = false;
    call.link_output = nullptr;
    if (!call.active) continue;
    DispatchMetrics* m = metrics_.empty() ? nullptr : metrics_[s].get();
    if (m != nullptr) {
      m->assignments->Increment(static_cast<double>(w.token.size()));
      m->tokens->Increment(static_cast<double>(w.rows.size()));
      call.sent_at = std::chrono::steady_clock::now();
    }
    if (StartOnDataPlane(lane, static_cast<int>(s), call)) continue;
    auto& req = call.request;
    req.set_layer(static_cast<uint32_t>(lane.layer));
    req.set_num_tokens(static_cast<uint32_t>(w.rows.size()));
    StageHidden(lane, static_cast<int>(s), call, w);
    req.mutable_token()->Assign(w.token.begin(), w.token.end());
    req.mutable_expert()->Assign(w.expert.begin(), w.expert.end());
    req.mutable_weight()->Assign(w.weight.begin(), w.weight.end());
    call.response.Clear();
    call.context = std::make_unique<grpc::ClientContext>();
    call.context->set_deadline(std::chrono::system_clock::now() + options_.deadline);
    {
      absl::MutexLock lock(&lane.mu);
      ++lane.outstanding;
    }
    pool_.stub(static_cast<int>(s))
        .async()
        ->ComputeExperts(call.context.get(), &call.request, &call.response,
                         [&lane, &call, m](grpc::Status status) {
                           if (m != nullptr) {
                             Record(*m, call.sent_at, call.request.ByteSizeLong(),
                                    status.ok() ? call.response.ByteSizeLong() : 0,
                                    status.error_code());
                           }
                           absl::MutexLock lock(&lane.mu);
                           call.status = std::move(status);
                           if (--lane.outstanding == 0) lane.done_cv.Signal();
                         });
  }
  return absl::OkStatus();
}

void ExpertDispatcher::StageHidden(const Lane& lane, int server, Call& call,
                                   const router::ServerWork& w) {
  const int64_t H = config_.hidden_size;
  auto& req = call.request;
  call.side_output = nullptr;
  call.over_side_channel = false;
  DispatchSideChannel* side = options_.side_channel;
  const uint64_t channel = side != nullptr ? side->ChannelTo(server) : 0;
  if (channel != 0) {
    const absl::Status posted = side->Post(server, lane.x, w.rows);
    if (posted.ok()) {
      call.over_side_channel = true;
      req.set_nccl_channel(channel);
      req.clear_hidden();
      return;
    }
    options_.logger->Log(LogLevel::kWarning,
                         absl::StrCat("dispatch: expert server ", server,
                                      ": this call goes by gRPC: ", posted.message()));
  }
  req.set_nccl_channel(0);
  std::string* hidden = req.mutable_hidden();
  hidden->resize(w.rows.size() * H * sizeof(float));
  for (size_t i = 0; i < w.rows.size(); ++i) {
    std::memcpy(hidden->data() + i * H * sizeof(float), lane.x + w.rows[i] * H, H * sizeof(float));
  }
}

bool ExpertDispatcher::CollectSideChannel(Lane& lane) {
  bool resend = false;
  for (size_t s = 0; s < lane.calls.size(); ++s) {
    Call& call = lane.calls[s];
    if (!call.active || !call.over_side_channel || call.side_output != nullptr) continue;
    absl::StatusOr<const float*> out =
        options_.side_channel->Collect(static_cast<int>(s), CallResult(lane, static_cast<int>(s)));
    if (out.ok()) {
      call.side_output = *out;
      continue;
    }
    call.over_side_channel = false;  // closed: the next send to this server goes by gRPC
    if (call.status.ok()) {
      // The server computed, but its outputs did not arrive: the channel failed, not the
      // server, which stays available for the resend by gRPC.
      options_.logger->Log(LogLevel::kWarning,
                           absl::StrCat("dispatch: expert server ", s,
                                        ": sent again by gRPC: ", out.status().message()));
      resend = true;
    }
  }
  return resend;
}

void ExpertDispatcher::Record(DispatchMetrics& m, std::chrono::steady_clock::time_point sent_at,
                              size_t sent_bytes, size_t received_bytes, grpc::StatusCode code) {
  m.round_trip->Observe(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - sent_at).count());
  m.sent_bytes->Increment(static_cast<double>(sent_bytes));
  m.received_bytes->Increment(static_cast<double>(received_bytes));
  rpc::CountCode(m.calls, code);
}

bool ExpertDispatcher::StartOnDataPlane(Lane& lane, int server, Call& call) {
  if (lane.links == nullptr || !lane.links->HasEndpoint(server)) return false;
  if (options_.side_channel != nullptr && options_.side_channel->ChannelTo(server) != 0) {
    return false;  // the NCCL path carries the tensors
  }
  const router::ServerWork& w = lane.work[server];
  const LinkCall link{
      static_cast<uint32_t>(lane.layer), lane.x, w.rows, w.token, w.expert, w.weight};
  const absl::Status started = lane.links->Start(server, link, lane.deadline);
  // Logged when the server's data plane starts failing, not on every call while it does.
  const bool was_failing = lane.link_failing[server];
  lane.link_failing[server] = !started.ok();
  if (!started.ok()) {
    if (!was_failing) {
      options_.logger->Log(LogLevel::kWarning, absl::StrCat("dispatch: ", pool_.Name(server),
                                                            ": data plane: ", started.message(),
                                                            "; its calls go by gRPC meanwhile"));
    }
    return false;
  }
  call.over_data_plane = true;  // counted in the metrics once collected (Wait)
  return true;
}

void ExpertDispatcher::Wait(Lane& lane) {
  bool any_link = false;
  for (const Call& call : lane.calls) any_link |= call.active && call.over_data_plane;
  if (any_link) {
    // The data plane's I/O runs here, on the runner's thread, while gRPC's calls (if any)
    // complete on its own threads.
    lane.links->WaitAll(lane.deadline);
    for (size_t s = 0; s < lane.calls.size(); ++s) {
      Call& call = lane.calls[s];
      if (!call.active || !call.over_data_plane) continue;
      const ExpertLinks::Result& r = lane.links->result(static_cast<int>(s));
      call.status = rpc::ToGrpc(r.status);
      call.link_output = r.status.ok() ? r.output : nullptr;
      if (!metrics_.empty()) {
        Record(*metrics_[s], call.sent_at, r.sent_bytes, r.received_bytes,
               call.status.error_code());
        metrics_[s]->data_plane_calls->Increment();
      }
    }
  }
  absl::MutexLock lock(&lane.mu);
  while (lane.outstanding != 0) lane.done_cv.Wait(&lane.mu);
}

bool ExpertDispatcher::MarkTransportFailures(Lane& lane) {
  bool any = false;
  for (size_t s = 0; s < lane.calls.size(); ++s) {
    const Call& call = lane.calls[s];
    // CANCELLED counts as well: the dispatcher never cancels its own calls, so a cancelled one
    // was cancelled by the server, which does that to calls it has not handled when it shuts
    // down (a graceful stop, e.g. SIGTERM in a rolling update): like a dead server, its
    // replicas can take the work.
    if (!call.active || !(rpc::IsTransportFailure(call.status) ||
                          call.status.error_code() == grpc::StatusCode::CANCELLED))
      continue;
    any = true;
    pool_.MarkDown(static_cast<int>(s),
                   absl::StrCat("a dispatch call failed: ", call.status.error_message()));
    planner_.SetAvailable(static_cast<int>(s), false);
  }
  return any;
}

absl::Status ExpertDispatcher::CallResult(const Lane& lane, int server) const {
  const Call& call = lane.calls[server];
  if (call.status.ok()) return absl::OkStatus();
  const router::ServerWork& w = lane.work[server];
  const std::set<int32_t> experts(w.expert.begin(), w.expert.end());
  std::string names;
  for (int32_t e : experts) absl::StrAppend(&names, names.empty() ? "" : ", ", e);
  return pool_.CallStatus(
      server,
      absl::StrCat("ComputeExperts on routed experts of layer ", lane.layer, " [", names, "]"),
      call.status);
}

absl::Status ExpertDispatcher::Finish(int lane_index, float* out) {
  if (lane_index < 0 || lane_index >= lanes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dispatch lane ", lane_index, " outside [0, ", lanes(), ")"));
  }
  Lane& lane = *lanes_[lane_index];
  // A server that fails in transport (dead, or past its deadline) is marked down and the layer
  // is dispatched again over the others: replicas take over with identical results. Without a
  // replica the plan fails, naming the experts no available server holds.
  for (;;) {
    Wait(lane);
    bool resend = options_.side_channel != nullptr && CollectSideChannel(lane);
    resend = MarkTransportFailures(lane) || resend;
    // No replica left for some expert: report the failed calls, which name their experts.
    if (!resend || !Send(lane).ok()) break;
  }
  return Combine(lane, out);
}

absl::Status ExpertDispatcher::Combine(const Lane& lane, float* out) const {
  const int64_t H = config_.hidden_size;
  std::memset(out, 0, sizeof(float) * lane.num_tokens * H);
  absl::Status first_error;
  for (size_t s = 0; s < lane.calls.size(); ++s) {
    const Call& call = lane.calls[s];
    if (!call.active) continue;
    const router::ServerWork& w = lane.work[s];
    if (!call.status.ok()) {
      first_error.Update(CallResult(lane, static_cast<int>(s)));
      continue;
    }
    const bool carried = call.side_output != nullptr || call.link_output != nullptr;
    if (!carried && call.response.output().size() != w.rows.size() * H * sizeof(float)) {
      first_error.Update(absl::InternalError(
          absl::StrCat(pool_.Name(static_cast<int>(s)), " answered ", call.response.output().size(),
                       " bytes for ", w.rows.size(), " tokens")));
      continue;
    }
    const float* y = call.side_output != nullptr ? call.side_output
                     : call.link_output != nullptr
                         ? call.link_output
                         : reinterpret_cast<const float*>(call.response.output().data());
    for (size_t i = 0; i < w.rows.size(); ++i) {
      float* o = out + w.rows[i] * H;
      for (int64_t h = 0; h < H; ++h) o[h] += y[i * H + h];
    }
  }
  return first_error;
}

void ExpertDispatcher::SetPlacement(std::shared_ptr<const router::Placement> placement) {
  planner_.SetPlacement(*placement);
  absl::MutexLock lock(&placement_mu_);
  placement_ = std::move(placement);
}

std::shared_ptr<const router::Placement> ExpertDispatcher::placement() const {
  absl::MutexLock lock(&placement_mu_);
  return placement_;
}

absl::Status ExpertDispatcher::VerifyServer(int s) const {
  DSMOE_ASSIGN_OR_RETURN(const internal::v1::GetExpertsResponse resp,
                         pool_.GetExperts(s, options_.deadline));
  if (resp.hidden_size() != config_.hidden_size) {
    return absl::FailedPreconditionError(absl::StrCat(pool_.Name(s), " serves hidden size ",
                                                      resp.hidden_size(), ", the model has ",
                                                      config_.hidden_size));
  }
  std::set<std::pair<int64_t, int64_t>> held;
  for (int i = 0; i < resp.layers_size(); ++i) held.insert({resp.layers(i), resp.experts(i)});
  // Its data plane, if it serves one, takes the calls from now on (a restarted server may
  // listen on another port).
  const absl::StatusOr<rpc::HostPort> grpc_address = rpc::SplitHostPort(pool_.address(s));
  for (const auto& lane : lanes_) {
    if (lane->links != nullptr && grpc_address.ok()) {
      lane->links->SetEndpoint(s, grpc_address->host, resp.data_port());
    }
  }
  const std::shared_ptr<const router::Placement> p = placement();
  const std::vector<std::pair<int64_t, int64_t>> assigned = p->ExpertsOf(s);
  int64_t missing = 0;
  for (const auto& le : assigned) missing += held.count(le) ? 0 : 1;
  if (missing == 0) return absl::OkStatus();
  internal::v1::SetPlacementRequest resync;
  resync.set_version(p->version());
  for (const auto& [layer, expert] : assigned) {
    resync.add_layers(static_cast<uint32_t>(layer));
    resync.add_experts(static_cast<uint32_t>(expert));
  }
  const absl::StatusOr<internal::v1::SetPlacementResponse> told =
      pool_.SetPlacement(s, resync, options_.deadline);
  const std::string what =
      absl::StrCat(pool_.Name(s), " holds placement version ", resp.placement_version(),
                   " and lacks ", missing, " of the ", assigned.size(),
                   " routed experts placement version ", p->version(), " assigns it");
  if (!told.ok()) {
    return absl::FailedPreconditionError(
        absl::StrCat(what, "; telling it to load them failed: ", told.status().message()));
  }
  return absl::UnavailableError(
      absl::StrCat(what, ": told it to load them (re-sync); admitted once it serves them"));
}

}  // namespace dsmoe
