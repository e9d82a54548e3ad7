#include "gateway/gateway_service.h"

#include <chrono>
#include <cmath>
#include <optional>

#include "core/model/make_model.h"
#include "core/rpc/grpc_status.h"
#include "core/rpc/server.h"
#include "gateway/request_validation.h"
#include "gateway/stop_string_filter.h"

namespace dsmoe {

namespace {

using Clock = std::chrono::steady_clock;

grpc::Status Invalid(const std::string& message) {
  return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, message);
}

// Counts a request in flight for as long as it lives (and in `gauge`, if given).
class InFlight {
 public:
  explicit InFlight(std::atomic<int64_t>& counter, prometheus::Gauge* gauge = nullptr)
      : counter_(counter), gauge_(gauge) {
    counter_.fetch_add(1);
    if (gauge_ != nullptr) gauge_->Increment();
  }
  ~InFlight() {
    counter_.fetch_sub(1);
    if (gauge_ != nullptr) gauge_->Decrement();
  }

 private:
  std::atomic<int64_t>& counter_;
  prometheus::Gauge* gauge_;
};

}  // namespace

GatewayService::GatewayService(const ModelConfig& config, const GenerationConfig& generation,
                               std::unique_ptr<Tokenizer> tokenizer,
                               const std::vector<std::string>& attention_servers,
                               const std::vector<std::string>& expert_servers,
                               const GatewayOptions& options)
    : config_(config),
      generation_(generation),
      tokenizer_(std::move(tokenizer)),
      options_(options),
      expert_servers_(expert_servers) {
  for (const std::string& a : attention_servers) {
    auto u = std::make_unique<Upstream>();
    u->index = static_cast<int>(upstreams_.size());
    u->address = a;
    u->stub =
        internal::v1::AttentionService::NewStub(rpc::MakeChannel(a, options_.upstream_security));
    upstreams_.push_back(std::move(u));
  }
  if (options_.max_context <= 0) options_.max_context = config.max_position_embeddings;
  if (options_.max_prompt_tokens <= 0) options_.max_prompt_tokens = options_.max_context - 1;
  if (options_.metrics != nullptr) metrics_ = std::make_unique<Metrics>(*options_.metrics);
}

GatewayService::Metrics::Metrics(rpc::MetricsRegistry& r) {
  auto& req = r.Counter("dsmoe_requests_total",
                        "Gateway calls finished, by method and gRPC code (errors: code != OK)");
  const char* names[kNumMethods] = {"Generate", "Complete", "Tokenize", "Detokenize",
                                    "GetModelInfo"};
  for (int m = 0; m < kNumMethods; ++m)
    requests[m] = rpc::AddCodeCounters(req, {{"method", names[m]}});
  auto& finished =
      r.Counter("dsmoe_requests_finished_total",
                "Generate/Complete requests completed, by finish_reason (stop, length, abort)");
  finished_stop = &finished.Add({{"finish_reason", "stop"}});
  finished_length = &finished.Add({{"finish_reason", "length"}});
  finished_abort = &finished.Add({{"finish_reason", "abort"}});
  ttft = &r.Histogram("dsmoe_time_to_first_token_seconds",
                      "Time from a request's arrival to its first generated token")
              .Add({}, rpc::RequestLatencyBuckets());
  inter_token = &r.Histogram("dsmoe_inter_token_latency_seconds",
                             "Time between successive generated tokens of a request")
                     .Add({}, rpc::TokenLatencyBuckets());
  e2e = &r.Histogram("dsmoe_e2e_request_latency_seconds",
                     "Time from a request's arrival to its last token")
             .Add({}, rpc::RequestLatencyBuckets());
  in_flight =
      &r.Gauge("dsmoe_requests_in_flight", "Gateway requests (Generate, Complete) in flight")
           .Add({});
}

grpc::Status GatewayService::Admit(grpc::ServerContext* context, int* key) {
  *key = -1;
  if (options_.auth == nullptr) return grpc::Status::OK;
  Authenticator::Admission a = options_.auth->Admit(context);
  *key = a.key;
  return a.status;
}

grpc::Status GatewayService::Counted(Method method, grpc::Status status) {
  if (metrics_ != nullptr) rpc::CountCode(metrics_->requests[method], status.error_code());
  return status;
}

void GatewayService::CountFinished(dsmoe::v1::FinishReason reason) {
  if (metrics_ == nullptr) return;
  (reason == dsmoe::v1::FINISH_REASON_STOP     ? metrics_->finished_stop
   : reason == dsmoe::v1::FINISH_REASON_LENGTH ? metrics_->finished_length
                                               : metrics_->finished_abort)
      ->Increment();
}

grpc::Status GatewayService::Generate(grpc::ServerContext* context,
                                      const dsmoe::v1::GenerateRequest* request,
                                      grpc::ServerWriter<dsmoe::v1::GenerateResponse>* writer) {
  int key;
  if (grpc::Status s = Admit(context, &key); !s.ok()) return Counted(kGenerate, s);
  return Counted(kGenerate, GenerateImpl(context, request, key, writer));
}

grpc::Status GatewayService::Complete(grpc::ServerContext* context,
                                      const dsmoe::v1::GenerateRequest* request,
                                      dsmoe::v1::CompleteResponse* response) {
  int key;
  if (grpc::Status s = Admit(context, &key); !s.ok()) return Counted(kComplete, s);
  return Counted(kComplete, CompleteImpl(context, request, key, response));
}

grpc::Status GatewayService::Tokenize(grpc::ServerContext* context,
                                      const dsmoe::v1::TokenizeRequest* request,
                                      dsmoe::v1::TokenizeResponse* response) {
  int key;
  if (grpc::Status s = Admit(context, &key); !s.ok()) return Counted(kTokenize, s);
  return Counted(kTokenize, TokenizeImpl(request, response));
}

grpc::Status GatewayService::Detokenize(grpc::ServerContext* context,
                                        const dsmoe::v1::DetokenizeRequest* request,
                                        dsmoe::v1::DetokenizeResponse* response) {
  int key;
  if (grpc::Status s = Admit(context, &key); !s.ok()) return Counted(kDetokenize, s);
  return Counted(kDetokenize, DetokenizeImpl(request, response));
}

grpc::Status GatewayService::GetModelInfo(grpc::ServerContext* context,
                                          const dsmoe::v1::GetModelInfoRequest*,
                                          dsmoe::v1::ModelInfo* info) {
  int key;
  if (grpc::Status s = Admit(context, &key); !s.ok()) return Counted(kGetModelInfo, s);
  return Counted(kGetModelInfo, GetModelInfoImpl(context, info));
}

grpc::Status GatewayService::Validate(const dsmoe::v1::GenerateRequest& r,
                                      internal::v1::AttentionGenerateRequest* up) const {
  const RequestLimits limits{options_.model_name, config_.vocab_size, options_.max_prompt_tokens,
                             options_.max_tokens_limit};
  return rpc::ToGrpc(ValidateGenerateRequest(r, limits, tokenizer_.get(), up));
}

GatewayService::Upstream* GatewayService::Pick(const std::vector<bool>& tried) const {
  // Serving servers first; one that is up but not serving (some routed expert has no live
  // server) can still run the requests that do not need those experts, so it comes next;
  // a down one never. Among equals, the fewest requests in flight.
  Upstream* best = nullptr;
  int best_rank = 0;
  for (const auto& u : upstreams_) {
    if (tried[u->index]) continue;
    const int rank = static_cast<int>(UpstreamHealth(u->index));
    if (rank == static_cast<int>(rpc::TargetHealth::kDown)) continue;
    if (best == nullptr || rank > best_rank ||
        (rank == best_rank && u->in_flight.load() < best->in_flight.load())) {
      best = u.get();
      best_rank = rank;
    }
  }
  return best;
}

rpc::TargetHealth GatewayService::UpstreamHealth(int index) const {
  return options_.upstream_health == nullptr ? rpc::TargetHealth::kServing
                                             : options_.upstream_health->health(index);
}

void GatewayService::OnUpstreamHealth(int index, rpc::TargetHealth now) {
  if (now != rpc::TargetHealth::kDown) return;
  // Its streams would otherwise hang until their deadlines (a frozen process keeps its
  // connections open): end them now, so the requests without tokens go elsewhere.
  Upstream& u = *upstreams_[index];
  std::lock_guard<std::mutex> lock(u.mu);
  for (ActiveCall* call : u.calls) {
    call->aborted = true;
    call->context->TryCancel();
  }
}

grpc::Status GatewayService::Relay(grpc::ServerContext* context,
                                   const internal::v1::AttentionGenerateRequest& request,
                                   const OnMessage& on_message) {
  if (upstreams_.empty())
    return grpc::Status(grpc::StatusCode::UNAVAILABLE, "no attention server configured");
  // A request that has produced no token yet can run anywhere with the same result (sampling
  // is seeded per request): if its attention server fails, it is retried on another one.
  // Once tokens went out, a retry would repeat or contradict them, so the client is told.
  std::vector<bool> tried(upstreams_.size(), false);
  std::string failures;
  for (;;) {
    Upstream* u = Pick(tried);
    if (u == nullptr) break;
    tried[u->index] = true;
    int64_t tokens = 0;
    grpc::Status status = RelayOnce(context, *u, request, on_message, &tokens);
    if (status.ok() || context->IsCancelled()) return status;
    if (tokens > 0) {
      return grpc::Status(status.error_code(),
                          absl::StrCat("the request failed after ", tokens,
                                       " tokens were delivered (not retried: they were already "
                                       "sent): ",
                                       status.error_message()));
    }
    if (status.error_code() != grpc::StatusCode::UNAVAILABLE) return status;
    absl::StrAppend(&failures, failures.empty() ? "" : "; ", status.error_message());
    if (options_.upstream_health != nullptr) options_.upstream_health->CheckNow();
  }
  if (!failures.empty()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        absl::StrCat("no attention server could run the request (", failures, ")"));
  }
  std::string why;
  for (const auto& u : upstreams_) {
    absl::StrAppend(&why, why.empty() ? "" : "; ", u->address, ": ",
                    options_.upstream_health->Reason(u->index));
  }
  return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                      absl::StrCat("no attention server is available (", why, ")"));
}

grpc::Status GatewayService::RelayOnce(grpc::ServerContext* context, Upstream& u,
                                       const internal::v1::AttentionGenerateRequest& request,
                                       const OnMessage& on_message, int64_t* tokens) {
  InFlight counted(u.in_flight);
  // The upstream call inherits the client's deadline and is cancelled with it.
  std::unique_ptr<grpc::ClientContext> upstream = grpc::ClientContext::FromServerContext(*context);
  ActiveCall call{upstream.get()};
  {
    std::lock_guard<std::mutex> lock(u.mu);  // from now on, a "down" verdict cancels it
    u.calls.insert(&call);
  }
  auto reader = u.stub->Generate(upstream.get(), request);
  internal::v1::AttentionGenerateResponse message;
  bool stopped_here = false;
  while (reader->Read(&message)) {
    *tokens += message.token_ids_size();
    if (!on_message(message)) {
      stopped_here = true;
      upstream->TryCancel();
      break;
    }
  }
  grpc::Status status = reader->Finish();
  bool aborted;
  {
    std::lock_guard<std::mutex> lock(u.mu);
    u.calls.erase(&call);
    aborted = call.aborted;
  }
  if (stopped_here) return grpc::Status::OK;  // a stop string, or the client went away
  if (aborted && !context->IsCancelled()) {
    return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                        absl::StrCat("attention server ", u.address, " is down (",
                                     options_.upstream_health->Reason(u.index), ")"));
  }
  if (!status.ok()) {
    return grpc::Status(status.error_code(),
                        absl::StrCat("attention server ", u.address, ": ", status.error_message()));
  }
  return status;
}

grpc::Status GatewayService::Run(grpc::ServerContext* context,
                                 const dsmoe::v1::GenerateRequest& request,
                                 const internal::v1::AttentionGenerateRequest& upstream, int key,
                                 const Emit& emit, dsmoe::v1::FinishReason* finish, double* ttft) {
  const auto start = Clock::now();
  auto last_token_at = start;
  *ttft = -1;
  *finish = dsmoe::v1::FINISH_REASON_UNSPECIFIED;
  std::optional<StreamingDecoder> decoder;
  if (tokenizer_ != nullptr) decoder.emplace(*tokenizer_, /*skip_special_tokens=*/true);
  // Text that could begin a stop string is held back until it cannot (a stop string may span
  // several tokens and messages; what was sent cannot be taken back).
  StopStringFilter stops(std::vector<std::string>(request.stop().begin(), request.stop().end()));
  bool client_gone = false;
  grpc::Status status =
      Relay(context, upstream, [&](const internal::v1::AttentionGenerateResponse& m) {
        if (m.token_ids_size() > 0) {
          if (key >= 0) options_.auth->ChargeTokens(key, m.token_ids_size());
          const auto now = Clock::now();
          if (*ttft < 0) {
            *ttft = std::chrono::duration<double>(now - start).count();
            if (metrics_ != nullptr) metrics_->ttft->Observe(*ttft);
          } else if (metrics_ != nullptr) {
            // Tokens arriving together share the gap since the previous ones.
            const double gap =
                std::chrono::duration<double>(now - last_token_at).count() / m.token_ids_size();
            for (int i = 0; i < m.token_ids_size(); ++i) metrics_->inter_token->Observe(gap);
          }
          last_token_at = now;
        }
        *finish = m.finish_reason();
        const bool last = m.finish_reason() != dsmoe::v1::FINISH_REASON_UNSPECIFIED;
        std::string decoded;
        if (decoder) {
          for (uint32_t id : m.token_ids()) {
            auto piece = decoder->Push(static_cast<int32_t>(id));
            if (piece.ok()) decoded += *piece;
          }
          if (last) {
            if (auto rest = decoder->Finish(); rest.ok()) decoded += *rest;
          }
        }
        std::string text = stops.Push(decoded);
        if (stops.stopped()) {
          *finish = dsmoe::v1::FINISH_REASON_STOP;
          if (!emit(m.token_ids(), text)) client_gone = true;
          return false;  // stops the sequence upstream
        }
        if (last) text += stops.Finish();
        if (m.token_ids_size() == 0 && text.empty()) return true;
        if (!emit(m.token_ids(), text)) {
          client_gone = true;
          return false;
        }
        return true;
      });
  if (!status.ok()) return status;
  if (client_gone) return grpc::Status(grpc::StatusCode::CANCELLED, "the client went away");
  if (*finish == dsmoe::v1::FINISH_REASON_UNSPECIFIED) *finish = dsmoe::v1::FINISH_REASON_ABORT;
  if (*ttft < 0) *ttft = 0;
  if (metrics_ != nullptr)
    metrics_->e2e->Observe(std::chrono::duration<double>(Clock::now() - start).count());
  CountFinished(*finish);
  return grpc::Status::OK;
}

grpc::Status GatewayService::GenerateImpl(grpc::ServerContext* context,
                                          const dsmoe::v1::GenerateRequest* request, int key,
                                          grpc::ServerWriter<dsmoe::v1::GenerateResponse>* writer) {
  InFlight counted(in_flight_, metrics_ ? metrics_->in_flight : nullptr);
  if (in_flight_.load() > options_.max_concurrent) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("the gateway is at its limit of ", options_.max_concurrent,
                                     " concurrent requests"));
  }
  internal::v1::AttentionGenerateRequest upstream;
  if (grpc::Status s = Validate(*request, &upstream); !s.ok()) return s;
  uint32_t completion_tokens = 0;
  dsmoe::v1::FinishReason finish;
  double ttft;
  grpc::Status status = Run(
      context, *request, upstream, key,
      [&](const google::protobuf::RepeatedField<uint32_t>& ids, const std::string& text) {
        completion_tokens += ids.size();
        dsmoe::v1::GenerateResponse out;
        *out.mutable_token_ids() = ids;
        out.set_text(text);
        return writer->Write(out);
      },
      &finish, &ttft);
  if (!status.ok()) return status;
  dsmoe::v1::GenerateResponse last;
  last.set_finish_reason(finish);
  last.mutable_usage()->set_prompt_tokens(upstream.prompt_token_ids_size());
  last.mutable_usage()->set_completion_tokens(completion_tokens);
  last.mutable_usage()->set_time_to_first_token_seconds(ttft);
  writer->Write(last);
  return grpc::Status::OK;
}

grpc::Status GatewayService::CompleteImpl(grpc::ServerContext* context,
                                          const dsmoe::v1::GenerateRequest* request, int key,
                                          dsmoe::v1::CompleteResponse* response) {
  InFlight counted(in_flight_, metrics_ ? metrics_->in_flight : nullptr);
  if (in_flight_.load() > options_.max_concurrent) {
    return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                        absl::StrCat("the gateway is at its limit of ", options_.max_concurrent,
                                     " concurrent requests"));
  }
  internal::v1::AttentionGenerateRequest upstream;
  if (grpc::Status s = Validate(*request, &upstream); !s.ok()) return s;
  dsmoe::v1::FinishReason finish;
  double ttft;
  grpc::Status status = Run(
      context, *request, upstream, key,
      [&](const google::protobuf::RepeatedField<uint32_t>& ids, const std::string& text) {
        response->mutable_token_ids()->Add(ids.begin(), ids.end());
        response->mutable_text()->append(text);
        return true;
      },
      &finish, &ttft);
  if (!status.ok()) return status;
  response->set_finish_reason(finish);
  response->mutable_usage()->set_prompt_tokens(upstream.prompt_token_ids_size());
  response->mutable_usage()->set_completion_tokens(response->token_ids_size());
  response->mutable_usage()->set_time_to_first_token_seconds(ttft);
  return grpc::Status::OK;
}

grpc::Status GatewayService::TokenizeImpl(const dsmoe::v1::TokenizeRequest* request,
                                          dsmoe::v1::TokenizeResponse* response) {
  if (tokenizer_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this model has no tokenizer (no tokenizer.json)");
  }
  auto ids = tokenizer_->Encode(request->text(), request->add_special_tokens());
  if (!ids.ok()) return Invalid(std::string(ids.status().message()));
  response->mutable_token_ids()->Add(ids->begin(), ids->end());
  return grpc::Status::OK;
}

grpc::Status GatewayService::DetokenizeImpl(const dsmoe::v1::DetokenizeRequest* request,
                                            dsmoe::v1::DetokenizeResponse* response) {
  if (tokenizer_ == nullptr) {
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        "this model has no tokenizer (no tokenizer.json)");
  }
  const std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  for (int32_t id : ids) {
    if (id < 0)
      return Invalid(absl::StrCat("token id ", static_cast<uint32_t>(id), " is out of range"));
  }
  auto text = tokenizer_->Decode(ids, request->skip_special_tokens());
  if (!text.ok()) return Invalid(std::string(text.status().message()));
  response->set_text(*text);
  return grpc::Status::OK;
}

grpc::Status GatewayService::GetModelInfoImpl(grpc::ServerContext* context,
                                              dsmoe::v1::ModelInfo* info) {
  const ModelConfig& c = config_;
  info->set_model(options_.model_name);
  info->set_architecture("DeepseekForCausalLM");
  info->set_model_type(c.model_type);
  info->set_vocab_size(static_cast<uint32_t>(c.vocab_size));
  info->set_hidden_size(static_cast<uint32_t>(c.hidden_size));
  info->set_num_layers(static_cast<uint32_t>(c.num_hidden_layers));
  info->set_num_moe_layers(static_cast<uint32_t>(c.NumMoeLayers()));
  info->set_num_attention_heads(static_cast<uint32_t>(c.num_attention_heads));
  info->set_num_key_value_heads(static_cast<uint32_t>(c.num_key_value_heads));
  info->set_num_routed_experts(static_cast<uint32_t>(c.n_routed_experts));
  info->set_num_shared_experts(static_cast<uint32_t>(c.n_shared_experts));
  info->set_num_experts_per_tok(static_cast<uint32_t>(c.num_experts_per_tok));
  info->set_expert_intermediate_size(static_cast<uint32_t>(c.moe_intermediate_size));
  info->set_max_context(static_cast<uint32_t>(options_.max_context));
  const ParameterCount params = CountParameters(c);
  info->set_num_parameters(static_cast<uint64_t>(params.total));
  info->set_num_active_parameters(static_cast<uint64_t>(params.active));
  info->set_num_attention_servers(static_cast<uint32_t>(upstreams_.size()));
  info->set_has_tokenizer(tokenizer_ != nullptr);
  for (const std::string& address : expert_servers_) {
    auto stub =
        internal::v1::ExpertService::NewStub(rpc::MakeChannel(address, options_.upstream_security));
    grpc::ClientContext ctx;
    ctx.set_deadline(
        std::min(context->deadline(), std::chrono::system_clock::now() + std::chrono::seconds(5)));
    internal::v1::GetExpertsResponse held;
    grpc::Status s = stub->GetExperts(&ctx, internal::v1::GetExpertsRequest(), &held);
    if (!s.ok()) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE,
                          absl::StrCat("expert server ", address, ": ", s.error_message()));
    }
    auto* e = info->add_expert_servers();
    e->set_address(address);
    e->mutable_layers()->CopyFrom(held.layers());
    e->mutable_experts()->CopyFrom(held.experts());
  }
  return grpc::Status::OK;
}

}  // namespace dsmoe
