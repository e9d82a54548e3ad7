#include "attention-server/attention_service.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <optional>
#include <span>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/grpc_status.h"
#include "core/rpc/server.h"

namespace dsmoe {

namespace {

dsmoe::v1::FinishReason ToProto(FinishReason r) {
  return r == FinishReason::kStop ? dsmoe::v1::FINISH_REASON_STOP : dsmoe::v1::FINISH_REASON_LENGTH;
}

// `lp` as the API gives it; token strings are left to the gateway (it has the tokenizer).
void ToProto(const TokenLogprobs& lp, dsmoe::v1::TokenLogprobs* out) {
  out->set_token_id(static_cast<uint32_t>(lp.token_id));
  out->set_logprob(lp.logprob);
  for (const TopLogprob& t : lp.top) {
    dsmoe::v1::TopLogprob* top = out->add_top_logprobs();
    top->set_token_id(static_cast<uint32_t>(t.token_id));
    top->set_logprob(t.logprob);
  }
}

// One Generate stream. The scheduler's thread pushes tokens (through the Sink, which it may
// hold after the stream ended), gRPC's threads complete writes and report cancellation; each
// decision is taken under mu_ and the gRPC call it implies made after releasing it. Writes go
// one at a time, Finish once, and only with no write in flight.
class GenerateReactor final
    : public grpc::ServerWriteReactor<internal::v1::AttentionGenerateResponse> {
 public:
  explicit GenerateReactor(Scheduler& scheduler) : scheduler_(scheduler) {}

  // Submits the sequence; the stream then runs by itself.
  void Start(SequenceParams params) {
    auto sink = std::make_shared<Sink>(this);
    sink_ = sink;
    auto id = scheduler_.Submit(std::move(params), std::move(sink));
    if (!id.ok()) {
      sink_->Detach();
      {
        absl::MutexLock lock(&mu_);
        finishing_ = true;
      }
      return Finish(rpc::ToGrpc(id.status()));
    }
    bool cancelled;
    {
      absl::MutexLock lock(&mu_);
      id_ = *id;
      cancelled = cancelled_;  // OnCancel came before the id was known
    }
    if (cancelled) scheduler_.Cancel(*id);
  }

  void OnWriteDone(bool ok) override {
    bool broke = false;
    {
      absl::MutexLock lock(&mu_);
      writing_ = false;
      if (!ok && !end_) {  // the stream broke: stop the sequence
        end_ = grpc::Status(grpc::StatusCode::CANCELLED, "the stream to the caller broke");
        broke = true;
      }
    }
    if (broke) CancelSequence();
    Pump();
  }
  void OnCancel() override {
    {
      absl::MutexLock lock(&mu_);
      cancelled_ = true;
      if (!end_)
        end_ = grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request");
    }
    CancelSequence();
    Pump();
  }
  void OnDone() override {
    sink_->Detach();  // the scheduler may still hold the sink; it no longer reaches this
    delete this;
  }

 private:
  // The scheduler's end of the stream. Holds the reactor until Detach (its OnDone).
  class Sink final : public SequenceSink {
   public:
    explicit Sink(GenerateReactor* reactor) : reactor_(reactor) {}
    void OnToken(int32_t id) override {
      absl::MutexLock lock(&mu_);
      if (reactor_ != nullptr) reactor_->Add(id, has_logprobs_ ? &logprobs_ : nullptr);
      has_logprobs_ = false;
    }
    // Kept for the OnToken that follows: the token and its logprobs go out in one message.
    void OnLogprobs(const TokenLogprobs& lp) override {
      absl::MutexLock lock(&mu_);
      logprobs_.Clear();
      ToProto(lp, &logprobs_);
      has_logprobs_ = true;
    }
    // Once, before the first OnToken (or OnFinish): they go out with it, in one message.
    void OnPromptLogprobs(std::span<const TokenLogprobs> lps) override {
      google::protobuf::RepeatedPtrField<dsmoe::v1::TokenLogprobs> out;
      out.Reserve(static_cast<int>(lps.size()));
      for (const TokenLogprobs& lp : lps) ToProto(lp, out.Add());
      absl::MutexLock lock(&mu_);
      if (reactor_ != nullptr) reactor_->SetPromptLogprobs(std::move(out));
    }
    void OnFinish(FinishReason reason, const absl::Status& status) override {
      absl::MutexLock lock(&mu_);
      if (reactor_ != nullptr) reactor_->End(reason, status);
    }
    void Detach() {
      absl::MutexLock lock(&mu_);
      reactor_ = nullptr;
    }

   private:
    absl::Mutex mu_;  // held while calling the reactor, so Detach waits for such a call
    GenerateReactor* reactor_ ABSL_GUARDED_BY(mu_);
    dsmoe::v1::TokenLogprobs logprobs_ ABSL_GUARDED_BY(mu_);  // of the coming OnToken
    bool has_logprobs_ ABSL_GUARDED_BY(mu_) = false;
  };

  // `logprobs`: the token's, when the request asked for them.
  void Add(int32_t id, const dsmoe::v1::TokenLogprobs* logprobs) {
    {
      absl::MutexLock lock(&mu_);
      tokens_.push_back(id);
      if (logprobs != nullptr) *logprobs_.Add() = *logprobs;
    }
    Pump();
  }
  // Held for the next write (the one of the first token, or the last one): no Pump here.
  void SetPromptLogprobs(google::protobuf::RepeatedPtrField<dsmoe::v1::TokenLogprobs> lps) {
    absl::MutexLock lock(&mu_);
    prompt_logprobs_ = std::move(lps);
  }
  void End(FinishReason reason, const absl::Status& status) {
    {
      absl::MutexLock lock(&mu_);
      finished_ = true;
      reason_ = reason;
      // The tokens sampled before the failure are right and the client is still there: they
      // go out first, then the error (which counts them).
      if (!status.ok()) failure_ = rpc::ToGrpc(status);
    }
    Pump();
  }
  void CancelSequence() {
    uint64_t id;
    {
      absl::MutexLock lock(&mu_);
      id = id_;
    }
    if (id != 0) scheduler_.Cancel(id);
  }
  // Starts the next write or finishes the stream, whichever is due.
  void Pump() {
    enum { kNothing, kWrite, kFinish } action = kNothing;
    grpc::Status status;
    {
      absl::MutexLock lock(&mu_);
      if (writing_ || finishing_) return;
      if (end_) {
        finishing_ = true;
        status = *end_;
        action = kFinish;
      } else if (!tokens_.empty() || (finished_ && !failure_ && !last_written_)) {
        response_.Clear();
        response_.mutable_token_ids()->Assign(tokens_.begin(), tokens_.end());
        tokens_.clear();
        response_.mutable_logprobs()->Swap(&logprobs_);  // (cleared with response_ next time)
        response_.mutable_prompt_logprobs()->Swap(&prompt_logprobs_);
        if (finished_ && !failure_) {
          response_.set_finish_reason(ToProto(reason_));
          last_written_ = true;
        }
        writing_ = true;
        action = kWrite;
      } else if (failure_) {
        finishing_ = true;
        status = *failure_;
        action = kFinish;
      } else if (last_written_) {
        finishing_ = true;
        action = kFinish;  // with OK
      }
    }
    if (action == kWrite) StartWrite(&response_);
    if (action == kFinish) Finish(status);
  }

  Scheduler& scheduler_;
  std::shared_ptr<Sink> sink_;
  absl::Mutex mu_;
  uint64_t id_ ABSL_GUARDED_BY(mu_) = 0;              // the sequence (0 until submitted)
  std::vector<int32_t> tokens_ ABSL_GUARDED_BY(mu_);  // sampled, not yet written
  // Their log-probabilities, when the request asked (one per token).
  google::protobuf::RepeatedPtrField<dsmoe::v1::TokenLogprobs> logprobs_ ABSL_GUARDED_BY(mu_);
  // The prompt's, when the request asked: sent once, with the first token (or the end).
  google::protobuf::RepeatedPtrField<dsmoe::v1::TokenLogprobs> prompt_logprobs_
      ABSL_GUARDED_BY(mu_);
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // the scheduler finished the sequence
  FinishReason reason_ ABSL_GUARDED_BY(mu_) = FinishReason::kStop;
  bool last_written_ ABSL_GUARDED_BY(mu_) = false;  // the message with finish_reason
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool finishing_ ABSL_GUARDED_BY(mu_) = false;  // Finish was (being) called
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  // Ends the stream at once, unsent tokens dropped: the client cancelled, or its stream broke.
  std::optional<grpc::Status> end_ ABSL_GUARDED_BY(mu_);
  // The sequence failed: ends the stream once the tokens sampled before were written.
  std::optional<grpc::Status> failure_ ABSL_GUARDED_BY(mu_);
  internal::v1::AttentionGenerateResponse response_;  // the write in flight
};

}  // namespace

AttentionService::AttentionService(Scheduler& scheduler, const GenerationConfig& generation,
                                   const ExpertServerPool* expert_servers)
    : scheduler_(scheduler), generation_(generation), expert_servers_(expert_servers) {}

grpc::ServerWriteReactor<internal::v1::AttentionGenerateResponse>* AttentionService::Generate(
    grpc::CallbackServerContext*, const internal::v1::AttentionGenerateRequest* request) {
  SequenceParams params;
  params.prompt.assign(request->prompt_token_ids().begin(), request->prompt_token_ids().end());
  params.max_tokens = request->max_tokens();
  params.sampling = {request->temperature(), request->top_k(), request->top_p(), request->seed()};
  params.stop_token_ids.assign(request->stop_token_ids().begin(), request->stop_token_ids().end());
  params.logprobs = request->logprobs();
  params.top_logprobs = request->top_logprobs();  // the scheduler checks its range
  params.prompt_logprobs = request->has_prompt_logprobs();
  params.prompt_top_logprobs = request->prompt_logprobs();  // ... and this one's
  if (!request->ignore_eos()) {
    for (int64_t id : generation_.eos_token_ids)
      params.stop_token_ids.push_back(static_cast<int32_t>(id));
  }
  auto* reactor = new GenerateReactor(scheduler_);
  reactor->Start(std::move(params));
  return reactor;
}

grpc::Status AttentionService::GetLoad(grpc::ServerContext*, const internal::v1::GetLoadRequest*,
                                       internal::v1::LoadReport* response) {
  const SchedulerLoad load = scheduler_.GetLoad();
  response->set_running(static_cast<uint32_t>(load.running));
  response->set_waiting(static_cast<uint32_t>(load.waiting));
  response->set_num_slots(static_cast<uint32_t>(load.num_slots));
  return grpc::Status::OK;
}

grpc::Status AttentionService::ComputeLogits(grpc::ServerContext*,
                                             const internal::v1::ComputeLogitsRequest* request,
                                             internal::v1::ComputeLogitsResponse* response) {
  std::vector<int32_t> ids(request->token_ids().begin(), request->token_ids().end());
  auto logits = scheduler_.ComputeLogits(std::move(ids));
  if (!logits.ok()) return rpc::ToGrpc(logits.status());
  const int64_t V = scheduler_.config().vocab_size;
  response->set_num_tokens(static_cast<uint32_t>(logits->size() / V));
  response->set_vocab_size(static_cast<uint32_t>(V));
  response->set_logits(reinterpret_cast<const char*>(logits->data()),
                       logits->size() * sizeof(float));
  return grpc::Status::OK;
}

grpc::Status AttentionService::GetServingInfo(grpc::ServerContext* context,
                                              const internal::v1::GetServingInfoRequest*,
                                              internal::v1::ServingInfo* response) {
  if (expert_servers_ == nullptr) return grpc::Status::OK;  // no expert servers: none to list
  for (int s = 0; s < expert_servers_->num_servers(); ++s) {
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        context->deadline() - std::chrono::system_clock::now());
    absl::StatusOr<internal::v1::GetExpertsResponse> held = expert_servers_->GetExperts(
        s, std::clamp(left, std::chrono::milliseconds(1), std::chrono::milliseconds(5000)));
    // Whatever went wrong with one expert server, this attention server cannot say what the
    // cluster serves: the caller tries another attention server.
    if (!held.ok())
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, std::string(held.status().message()));
    auto* e = response->add_expert_servers();
    e->set_address(expert_servers_->address(s));
    e->mutable_layers()->CopyFrom(held->layers());
    e->mutable_experts()->CopyFrom(held->experts());
  }
  return grpc::Status::OK;
}

}  // namespace dsmoe
