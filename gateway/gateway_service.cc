#include "gateway/gateway_service.h"

#include <chrono>
#include <cmath>
#include <optional>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/model/model_facts.h"
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

// The bytes of a raw request, in one piece for the protobuf parser.
std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  out.reserve(buffer.Length());
  for (const grpc::Slice& s : slices) {
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

// `message` serialized into `out` (its previous contents, a write done, released first: the
// serializer requires an empty buffer), as gRPC would have for a typed method.
template <class Message>
grpc::Status Serialize(const Message& message, grpc::ByteBuffer* out) {
  out->Clear();
  bool own_buffer = false;
  return grpc::SerializationTraits<Message>::Serialize(message, out, &own_buffer);
}

}  // namespace

// One Generate or Complete: admission, validation, a place (or the queue), the relay through
// the pool, and on the way the metrics, the charged tokens, the text and the stop strings.
// Subclasses say where the output goes (a stream, or one response).
//
// Lifetime: a reference count. gRPC's OnDone holds one reference; every entry from outside a
// reaction (the handler itself, a place given by another request's end) holds one while it
// runs, because the reactor may finish on another thread meanwhile. The last one deletes.
class GatewayService::Request : public GenerateObserver {
 public:
  // `request` is what ParseGenerateRequest made of the call's bytes (empty if it failed).
  Request(GatewayService& service, Method method, grpc::CallbackServerContext* context,
          dsmoe::v1::GenerateRequest request)
      : service_(service),
        method_(method),
        context_(context),
        request_(std::move(request)),
        stops_(std::vector<std::string>(request_.stop().begin(), request_.stop().end())),
        start_(Clock::now()),
        last_token_at_(start_) {
    if (service_.metrics_ != nullptr) service_.metrics_->in_flight->Increment();
    if (service_.tokenizer_ != nullptr)
      decoder_.emplace(*service_.tokenizer_, /*skip_special_tokens=*/true);
  }
  virtual ~Request() {
    if (service_.metrics_ != nullptr) service_.metrics_->in_flight->Decrement();
  }

  // Admits, validates and runs (or queues) the request; `parsed` is how its parse went (the
  // caller is admitted before a malformed request is refused). Called once, by the handler.
  void Begin(const absl::Status& parsed) {
    Ref();
    if (grpc::Status s = service_.Admit(context_, &key_); !s.ok()) {
      End(s);
    } else if (!parsed.ok()) {
      End(rpc::ToGrpc(parsed));
    } else if (grpc::Status v = service_.Validate(request_, &upstream_); !v.ok()) {
      End(v);
    } else {
      switch (service_.admission_.Enter(this)) {
        case Admission::Outcome::kRun:
          Start();
          break;
        case Admission::Outcome::kQueued: {
          absl::MutexLock lock(&mu_);
          queued_ = !admitted_;  // a place may have come between Enter and here
          break;
        }
        case Admission::Outcome::kRefused:
          End(grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                           service_.admission_.LimitMessage()));
          break;
      }
    }
    Unref();
  }

  // The request got a place after waiting for it (on the thread of the request that left it).
  void Admitted() {
    Ref();
    {
      absl::MutexLock lock(&mu_);
      queued_ = false;
      admitted_ = true;
    }
    Start();
    Unref();
  }

  bool OnMessage(const internal::v1::AttentionGenerateResponse& m) override;
  void OnEnd(const absl::Status& status) override;

 protected:
  using Logprobs = google::protobuf::RepeatedPtrField<dsmoe::v1::TokenLogprobs>;
  // Output of the relay: token ids, the text they completed (stop strings applied) and, when
  // the request asked, the ids' log-probabilities with their token strings (moved from).
  virtual void Emit(const google::protobuf::RepeatedField<uint32_t>& ids, const std::string& text,
                    Logprobs& logprobs) = 0;
  // The prompt's log-probabilities (GenerateRequest.prompt_logprobs), once, before any Emit;
  // moved from.
  virtual void EmitPromptLogprobs(Logprobs& logprobs) = 0;
  // The request ended with `status` (counted already); on OK, finish_ and ttft_ are final.
  // Implementations finish the RPC.
  virtual void Finished(const grpc::Status& status) = 0;

  // The client cancelled or went away: stops the request wherever it is.
  void Cancel() {
    std::shared_ptr<AttentionServerPool::Call> call;
    bool queued;
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      call = call_;
      queued = queued_;
    }
    if (queued && service_.admission_.Remove(this)) {
      End(grpc::Status(grpc::StatusCode::CANCELLED,
                       "the request was cancelled while waiting for a place"));
    } else if (call != nullptr) {
      call->Cancel();
    }
  }
  // The stream to the client broke: the relay stops at its next message.
  void ClientGone() {
    client_gone_ = true;
    Cancel();
  }

  void Ref() { refs_.fetch_add(1); }
  void Unref() {
    if (refs_.fetch_sub(1) == 1) delete this;
  }

  const internal::v1::AttentionGenerateRequest& upstream() const { return upstream_; }
  dsmoe::v1::FinishReason finish_ = dsmoe::v1::FINISH_REASON_UNSPECIFIED;
  double ttft_ = -1;

 private:
  // Relays the request (it holds a place).
  void Start() {
    {
      absl::MutexLock lock(&mu_);
      if (cancelled_) {
        service_.admission_.Release();
        return End(grpc::Status(grpc::StatusCode::CANCELLED, "the request was cancelled"));
      }
    }
    relaying_ = true;
    auto call = service_.pool_.Generate(*context_, upstream_, this);
    bool cancel;
    {
      absl::MutexLock lock(&mu_);
      call_ = call;
      cancel = cancelled_;  // a Cancel() that came while the call started found no call
    }
    if (cancel) call->Cancel();
  }
  // Counts the end and hands it to the subclass. Called once.
  void End(const grpc::Status& status) { Finished(service_.Counted(method_, status)); }

  GatewayService& service_;
  const Method method_;
  grpc::CallbackServerContext* const context_;
  const dsmoe::v1::GenerateRequest request_;
  internal::v1::AttentionGenerateRequest upstream_;
  int key_ = -1;  // the caller's API key, charged for the tokens generated
  std::optional<StreamingDecoder> decoder_;
  StopStringFilter stops_;
  const Clock::time_point start_;
  Clock::time_point last_token_at_;
  bool relaying_ = false;                 // holds a place (released when the relay ends)
  bool prompt_logprobs_emitted_ = false;  // the relay's calls never overlap: no lock
  std::atomic<bool> client_gone_{false};
  std::atomic<int> refs_{1};  // gRPC's, until OnDone

  absl::Mutex mu_;
  bool queued_ ABSL_GUARDED_BY(mu_) = false;    // in the admission queue
  bool admitted_ ABSL_GUARDED_BY(mu_) = false;  // given a place after waiting
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::shared_ptr<AttentionServerPool::Call> call_ ABSL_GUARDED_BY(mu_);
};

bool GatewayService::Request::OnMessage(const internal::v1::AttentionGenerateResponse& m) {
  Metrics* metrics = service_.metrics_.get();
  if (m.token_ids_size() > 0) {
    if (key_ >= 0) service_.options_.auth->ChargeTokens(key_, m.token_ids_size());
    const auto now = Clock::now();
    if (ttft_ < 0) {
      ttft_ = std::chrono::duration<double>(now - start_).count();
      if (metrics != nullptr) metrics->ttft->Observe(ttft_);
    } else if (metrics != nullptr) {
      // Tokens arriving together share the gap since the previous ones.
      const double gap =
          std::chrono::duration<double>(now - last_token_at_).count() / m.token_ids_size();
      for (int i = 0; i < m.token_ids_size(); ++i) metrics->inter_token->Observe(gap);
    }
    last_token_at_ = now;
  }
  finish_ = m.finish_reason();
  const bool last = m.finish_reason() != dsmoe::v1::FINISH_REASON_UNSPECIFIED;
  std::string decoded;
  if (decoder_) {
    for (uint32_t id : m.token_ids()) {
      auto piece = decoder_->Push(static_cast<int32_t>(id));
      if (piece.ok()) decoded += *piece;
    }
    if (last) {
      if (auto rest = decoder_->Finish(); rest.ok()) decoded += *rest;
    }
  }
  // Each token's own text beside its log-probability (the attention server has no tokenizer).
  auto name_tokens = [&](Logprobs& lps) {
    if (service_.tokenizer_ == nullptr) return;
    for (dsmoe::v1::TokenLogprobs& lp : lps) {
      lp.set_token(service_.TokenText(lp.token_id()));
      for (dsmoe::v1::TopLogprob& top : *lp.mutable_top_logprobs())
        top.set_token(service_.TokenText(top.token_id()));
    }
  };
  // The prompt's come once, with the first token (or alone with max_tokens 0): they go first.
  // (Once only: a request without tokens yet may be retried on another attention server.)
  if (m.prompt_logprobs_size() > 0 && !prompt_logprobs_emitted_) {
    prompt_logprobs_emitted_ = true;
    Logprobs prompt = m.prompt_logprobs();
    name_tokens(prompt);
    EmitPromptLogprobs(prompt);
  }
  Logprobs logprobs = m.logprobs();
  name_tokens(logprobs);
  std::string text = stops_.Push(decoded);
  if (stops_.stopped()) {
    finish_ = dsmoe::v1::FINISH_REASON_STOP;
    Emit(m.token_ids(), text, logprobs);
    return false;  // stops the sequence upstream
  }
  if (last) text += stops_.Finish();
  if (m.token_ids_size() > 0 || !text.empty()) Emit(m.token_ids(), text, logprobs);
  return !client_gone_;
}

void GatewayService::Request::OnEnd(const absl::Status& relayed) {
  if (relaying_) service_.admission_.Release();  // the next waiting request may start now
  if (client_gone_) {
    return End(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
  }
  if (!relayed.ok()) return End(rpc::ToGrpc(relayed));
  if (finish_ == dsmoe::v1::FINISH_REASON_UNSPECIFIED) finish_ = dsmoe::v1::FINISH_REASON_ABORT;
  if (ttft_ < 0) ttft_ = 0;
  if (service_.metrics_ != nullptr) {
    service_.metrics_->e2e->Observe(std::chrono::duration<double>(Clock::now() - start_).count());
  }
  service_.CountFinished(finish_);
  End(grpc::Status::OK);
}

// Generate: the output goes out as it comes, one write in flight; what arrives meanwhile is
// merged into the next message, so a slow client costs one pending message, not a queue.
class GatewayService::StreamReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer>,
                                            public GatewayService::Request {
 public:
  StreamReactor(GatewayService& service, grpc::CallbackServerContext* context,
                dsmoe::v1::GenerateRequest request)
      : Request(service, kGenerate, context, std::move(request)) {}

  void OnWriteDone(bool ok) override {
    if (!ok) ClientGone();
    Pump(/*write_done=*/true);
  }
  void OnCancel() override { Cancel(); }
  void OnDone() override { Unref(); }

 private:
  void Emit(const google::protobuf::RepeatedField<uint32_t>& ids, const std::string& text,
            Logprobs& logprobs) override {
    {
      absl::MutexLock lock(&mu_);
      completion_tokens_ += ids.size();
      if (pending_.empty()) pending_.emplace_back();
      dsmoe::v1::GenerateResponse& next = pending_.back();
      next.mutable_token_ids()->Add(ids.begin(), ids.end());
      next.mutable_text()->append(text);
      for (dsmoe::v1::TokenLogprobs& lp : logprobs) next.add_logprobs()->Swap(&lp);
    }
    Pump(/*write_done=*/false);
  }
  // No write started here: the first token's Emit (or the end) follows at once, and they go
  // out together in the stream's first message.
  void EmitPromptLogprobs(Logprobs& logprobs) override {
    absl::MutexLock lock(&mu_);
    if (pending_.empty()) pending_.emplace_back();  // nothing was emitted before
    pending_.back().mutable_prompt_logprobs()->Swap(&logprobs);
  }
  void Finished(const grpc::Status& status) override {
    {
      absl::MutexLock lock(&mu_);
      if (status.ok()) {
        dsmoe::v1::GenerateResponse& last = pending_.emplace_back();
        last.set_finish_reason(finish_);
        last.mutable_usage()->set_prompt_tokens(upstream().prompt_token_ids_size());
        last.mutable_usage()->set_completion_tokens(completion_tokens_);
        last.mutable_usage()->set_time_to_first_token_seconds(ttft_);
      }
      end_ = status;
    }
    Pump(/*write_done=*/false);
  }
  // Starts the next write, or finishes once everything was written (or the stream broke).
  // The decision is taken under mu_ (one write in flight, Finish once), the call made after.
  void Pump(bool write_done) {
    enum { kNothing, kWrite, kFinish } action = kNothing;
    grpc::Status end;
    {
      absl::MutexLock lock(&mu_);
      if (write_done) writing_ = false;
      if (writing_ || finishing_) return;
      if (!pending_.empty() && !broken_) {
        writing_msg_ = std::move(pending_.front());
        pending_.pop_front();
        writing_ = true;
        action = kWrite;
      } else if (end_) {
        finishing_ = true;
        end = *end_;
        action = kFinish;
      }
    }
    if (action == kWrite) {
      // The method is raw (GatewayServiceBase): the message goes out as its bytes.
      if (grpc::Status s = Serialize(writing_msg_, &writing_bytes_); !s.ok()) {
        return OnWriteDone(false);  // as a failed write: the stream ends
      }
      StartWrite(&writing_bytes_);
    }
    if (action == kFinish) Finish(end);
  }
  void ClientGone() {
    {
      absl::MutexLock lock(&mu_);
      broken_ = true;
    }
    Request::ClientGone();
  }

  absl::Mutex mu_;
  // Messages not yet written; new output is merged into the last one.
  std::deque<dsmoe::v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  dsmoe::v1::GenerateResponse writing_msg_;  // the write in flight
  grpc::ByteBuffer writing_bytes_;           // ... serialized
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;  // a write failed
  std::optional<grpc::Status> end_ ABSL_GUARDED_BY(mu_);
  uint32_t completion_tokens_ ABSL_GUARDED_BY(mu_) = 0;
};

// Complete: the output is gathered into the one response.
class GatewayService::CompleteReactor final : public grpc::ServerUnaryReactor,
                                              public GatewayService::Request {
 public:
  CompleteReactor(GatewayService& service, grpc::CallbackServerContext* context,
                  dsmoe::v1::GenerateRequest request, grpc::ByteBuffer* response)
      : Request(service, kComplete, context, std::move(request)), response_bytes_(response) {}

  void OnCancel() override { Cancel(); }
  void OnDone() override { Unref(); }

 private:
  void Emit(const google::protobuf::RepeatedField<uint32_t>& ids, const std::string& text,
            Logprobs& logprobs) override {
    response_.mutable_token_ids()->Add(ids.begin(), ids.end());
    response_.mutable_text()->append(text);
    for (dsmoe::v1::TokenLogprobs& lp : logprobs) response_.add_logprobs()->Swap(&lp);
  }
  void EmitPromptLogprobs(Logprobs& logprobs) override {
    response_.mutable_prompt_logprobs()->Swap(&logprobs);
  }
  void Finished(const grpc::Status& status) override {
    if (status.ok()) {
      response_.set_finish_reason(finish_);
      response_.mutable_usage()->set_prompt_tokens(upstream().prompt_token_ids_size());
      response_.mutable_usage()->set_completion_tokens(response_.token_ids_size());
      response_.mutable_usage()->set_time_to_first_token_seconds(ttft_);
      // The method is raw (GatewayServiceBase): the answer goes out as its bytes.
      return Finish(Serialize(response_, response_bytes_));
    }
    Finish(status);
  }

  dsmoe::v1::CompleteResponse response_;    // written only by the relay's calls
  grpc::ByteBuffer* const response_bytes_;  // gRPC's
};

GatewayService::Admission::Outcome GatewayService::Admission::Enter(Request* r) {
  absl::MutexLock lock(&mu_);
  if (running_ < max_running_) {
    ++running_;
    return Outcome::kRun;
  }
  if (static_cast<int64_t>(waiting_.size()) < max_queued_) {
    waiting_.push_back(r);
    return Outcome::kQueued;
  }
  return Outcome::kRefused;
}

bool GatewayService::Admission::Remove(Request* r) {
  absl::MutexLock lock(&mu_);
  auto it = std::find(waiting_.begin(), waiting_.end(), r);
  if (it == waiting_.end()) return false;
  waiting_.erase(it);
  return true;
}

void GatewayService::Admission::Release() {
  Request* next = nullptr;
  {
    absl::MutexLock lock(&mu_);
    if (waiting_.empty()) {
      --running_;
      return;
    }
    next = waiting_.front();  // takes over the place
    waiting_.pop_front();
  }
  next->Admitted();
}

std::string GatewayService::Admission::LimitMessage() const {
  return absl::StrCat("the gateway is at its limits: ", max_running_,
                      " requests in flight (--max-concurrent) and ", max_queued_,
                      " waiting for a place (--max-queued); retry later");
}

GatewayService::GatewayService(const ModelConfig& config, const GenerationConfig& generation,
                               std::unique_ptr<Tokenizer> tokenizer,
                               const std::vector<std::string>& attention_servers,
                               const GatewayOptions& options)
    : config_(config),
      generation_(generation),
      tokenizer_(std::move(tokenizer)),
      options_(options),
      pool_(attention_servers, options.upstream_security, options.upstream_health),
      admission_(options.max_concurrent, options.max_queued) {
  if (options_.max_context <= 0) options_.max_context = config.max_position_embeddings;
  if (options_.max_prompt_tokens <= 0) options_.max_prompt_tokens = options_.max_context - 1;
  if (options_.metrics != nullptr) metrics_ = std::make_unique<Metrics>(*options_.metrics);
}

GatewayService::~GatewayService() = default;

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

grpc::Status GatewayService::Admit(grpc::CallbackServerContext* context, int* key) {
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

grpc::ServerWriteReactor<grpc::ByteBuffer>* GatewayService::Generate(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* bytes) {
  dsmoe::v1::GenerateRequest request;
  const absl::Status parsed = ParseGenerateRequest(Flatten(*bytes), &request);
  auto* reactor = new StreamReactor(*this, context, std::move(request));
  reactor->Begin(parsed);
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Complete(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* bytes,
                                                   grpc::ByteBuffer* response) {
  dsmoe::v1::GenerateRequest request;
  const absl::Status parsed = ParseGenerateRequest(Flatten(*bytes), &request);
  auto* reactor = new CompleteReactor(*this, context, std::move(request), response);
  reactor->Begin(parsed);
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Tokenize(grpc::CallbackServerContext* context,
                                                   const grpc::ByteBuffer* bytes,
                                                   grpc::ByteBuffer* response_bytes) {
  int key;
  grpc::Status s = Admit(context, &key);
  dsmoe::v1::TokenizeRequest request;
  dsmoe::v1::TokenizeResponse response;
  if (s.ok()) s = rpc::ToGrpc(ParseTokenizeRequest(Flatten(*bytes), &request));
  if (s.ok()) s = TokenizeImpl(&request, &response);
  if (s.ok()) s = Serialize(response, response_bytes);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(Counted(kTokenize, s));
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::Detokenize(grpc::CallbackServerContext* context,
                                                     const dsmoe::v1::DetokenizeRequest* request,
                                                     dsmoe::v1::DetokenizeResponse* response) {
  int key;
  grpc::Status s = Admit(context, &key);
  if (s.ok()) s = DetokenizeImpl(request, response);
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(Counted(kDetokenize, s));
  return reactor;
}

grpc::ServerUnaryReactor* GatewayService::GetModelInfo(grpc::CallbackServerContext* context,
                                                       const dsmoe::v1::GetModelInfoRequest*,
                                                       dsmoe::v1::ModelInfo* info) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  int key;
  if (grpc::Status s = Admit(context, &key); !s.ok()) {
    reactor->Finish(Counted(kGetModelInfo, s));
    return reactor;
  }
  FillModelInfo(info);
  pool_.GetServingInfo(*context,
                       [this, reactor, info](absl::StatusOr<internal::v1::ServingInfo> serving) {
                         if (serving.ok())
                           info->mutable_expert_servers()->Swap(serving->mutable_expert_servers());
                         reactor->Finish(Counted(kGetModelInfo, rpc::ToGrpc(serving.status())));
                       });
  return reactor;
}

grpc::Status GatewayService::Validate(const dsmoe::v1::GenerateRequest& r,
                                      internal::v1::AttentionGenerateRequest* up) const {
  const RequestLimits limits{options_.model_name, config_.vocab_size, options_.max_prompt_tokens,
                             options_.max_tokens_limit};
  return rpc::ToGrpc(ValidateGenerateRequest(r, limits, tokenizer_.get(), up));
}

std::string GatewayService::TokenText(uint32_t id) const {
  const int32_t one = static_cast<int32_t>(id);
  auto text = tokenizer_->Decode(std::span<const int32_t>(&one, 1), /*skip_special_tokens=*/false);
  return text.ok() ? *std::move(text) : std::string();
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
  // As Generate refuses them: a tokenizer would decode an unknown id to nothing.
  if (absl::Status s = ValidateTokenIds(request->token_ids(), config_.vocab_size, "token_ids");
      !s.ok()) {
    return rpc::ToGrpc(s);
  }
  const std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  auto text = tokenizer_->Decode(ids, request->skip_special_tokens());
  if (!text.ok()) return Invalid(std::string(text.status().message()));
  response->set_text(*text);
  return grpc::Status::OK;
}

void GatewayService::FillModelInfo(dsmoe::v1::ModelInfo* info) {
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
  info->set_num_attention_servers(static_cast<uint32_t>(pool_.num_servers()));
  info->set_has_tokenizer(tokenizer_ != nullptr);
}

}  // namespace dsmoe
