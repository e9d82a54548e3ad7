#include "attention-server/attention_service.h"

#include <chrono>
#include <condition_variable>
#include <mutex>

#include "core/rpc/grpc_status.h"

namespace dsmoe {

namespace {

// Hands tokens from the scheduler's thread to the RPC handler's thread.
class QueueSink final : public SequenceSink {
 public:
  void OnToken(int32_t id) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tokens_.push_back(id);
    }
    cv_.notify_one();
  }
  void OnFinish(FinishReason reason, const absl::Status& status) override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      finished_ = true;
      reason_ = reason;
      status_ = status;
    }
    cv_.notify_one();
  }
  // Waits up to `timeout` for news; moves the tokens out. True once finished.
  bool Take(std::chrono::milliseconds timeout, std::vector<int32_t>* tokens, FinishReason* reason,
            absl::Status* status) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [this] { return finished_ || !tokens_.empty(); });
    tokens->swap(tokens_);
    tokens_.clear();
    *reason = reason_;
    *status = status_;
    return finished_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> tokens_;
  bool finished_ = false;
  FinishReason reason_ = FinishReason::kStop;
  absl::Status status_;
};

dsmoe::v1::FinishReason ToProto(FinishReason r) {
  return r == FinishReason::kStop ? dsmoe::v1::FINISH_REASON_STOP : dsmoe::v1::FINISH_REASON_LENGTH;
}

}  // namespace

grpc::Status AttentionService::Generate(
    grpc::ServerContext* context, const internal::v1::AttentionGenerateRequest* request,
    grpc::ServerWriter<internal::v1::AttentionGenerateResponse>* writer) {
  SequenceParams params;
  params.prompt.assign(request->prompt_token_ids().begin(), request->prompt_token_ids().end());
  params.max_tokens = request->max_tokens();
  params.sampling = {request->temperature(), request->top_k(), request->top_p(), request->seed()};
  params.stop_token_ids.assign(request->stop_token_ids().begin(), request->stop_token_ids().end());
  if (!request->ignore_eos()) {
    for (int64_t id : generation_.eos_token_ids)
      params.stop_token_ids.push_back(static_cast<int32_t>(id));
  }
  auto sink = std::make_shared<QueueSink>();
  auto id = scheduler_.Submit(std::move(params), sink);
  if (!id.ok()) return rpc::ToGrpc(id.status());

  std::vector<int32_t> tokens;
  FinishReason reason;
  absl::Status status;
  for (;;) {
    const bool finished = sink->Take(std::chrono::milliseconds(50), &tokens, &reason, &status);
    if (context->IsCancelled()) {
      scheduler_.Cancel(*id);
      return grpc::Status(grpc::StatusCode::CANCELLED, "the client cancelled the request");
    }
    if (!status.ok()) return rpc::ToGrpc(status);
    if (!tokens.empty() || finished) {
      internal::v1::AttentionGenerateResponse response;
      response.mutable_token_ids()->Assign(tokens.begin(), tokens.end());
      if (finished) response.set_finish_reason(ToProto(reason));
      if (!writer->Write(response)) {  // the stream broke: stop the sequence
        scheduler_.Cancel(*id);
        return grpc::Status(grpc::StatusCode::CANCELLED, "the stream to the caller broke");
      }
    }
    if (finished) return grpc::Status::OK;
  }
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

}  // namespace dsmoe
