#include "attention-server/client/attention_server_pool.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/rpc/grpc_status.h"
#include "core/rpc/server.h"

namespace dsmoe {

// One request: its attempts, one at a time, and what they taught (servers tried, failures).
// (Private to this file, so its members are open to the attempts.)
class AttentionServerPool::Relay final : public AttentionServerPool::Call,
                                         public std::enable_shared_from_this<Relay> {
 public:
  Relay(AttentionServerPool& pool, const grpc::CallbackServerContext& parent,
        internal::v1::AttentionGenerateRequest request, GenerateObserver* observer)
      : pool_(pool),
        parent_(parent),
        request_(std::move(request)),
        observer_(observer),
        tried_(pool.servers_.size(), false) {}

  void Cancel() override;

  // Starts an attempt on the next server, or ends the call when none is left.
  void StartNext();
  // From the attempt's reactor: relays one message; false stops the call.
  bool Message(const internal::v1::AttentionGenerateResponse& message);
  // From the attempt's reactor: its call ended with `status`; `aborted` when a health verdict
  // cancelled it.
  void AttemptDone(Server& server, const grpc::Status& status, bool aborted);
  // Tells the observer; the last thing the call does with it.
  void Done(const absl::Status& status) { observer_->OnEnd(status); }

  AttentionServerPool& pool_;
  const grpc::CallbackServerContext& parent_;
  const internal::v1::AttentionGenerateRequest request_;
  GenerateObserver* const observer_;

  absl::Mutex mu_;
  std::vector<bool> tried_ ABSL_GUARDED_BY(mu_);
  std::string failures_ ABSL_GUARDED_BY(mu_);        // the attempts' errors, for the message
  Attempt* attempt_ ABSL_GUARDED_BY(mu_) = nullptr;  // the attempt in flight
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
  std::atomic<int64_t> tokens_{0};    // relayed (only the attempt's reactor writes)
  std::atomic<bool> stopped_{false};  // the observer asked to stop
};

// One upstream Generate call on one server.
class AttentionServerPool::Attempt final
    : public grpc::ClientReadReactor<internal::v1::AttentionGenerateResponse> {
 public:
  Attempt(std::shared_ptr<Relay> call, Server& server)
      : call_(std::move(call)),
        server_(server),
        context_(grpc::ClientContext::FromCallbackServerContext(call_->parent_)) {}

  // REQUIRES: registered as the call's attempt (so Cancel reaches it).
  void Start() {
    server_.in_flight.fetch_add(1);
    {
      absl::MutexLock lock(&server_.mu);  // from now on, a "down" verdict cancels it
      server_.attempts.insert(this);
    }
    server_.stub->async()->Generate(context_.get(), &call_->request_, this);
    StartRead(&message_);
    StartCall();
  }
  void TryCancel() { context_->TryCancel(); }
  // Called with server_.mu held (through the server's attempts set, hence asserted, not
  // annotated: the analysis cannot tell that set's mutex is server_.mu).
  void AbortLocked() {
    server_.mu.AssertHeld();
    aborted_ = true;
    context_->TryCancel();
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended: OnDone follows
    if (call_->Message(message_)) {
      StartRead(&message_);
    } else {
      context_->TryCancel();
    }
  }
  void OnDone(const grpc::Status& status) override {
    bool aborted;
    {
      absl::MutexLock lock(&server_.mu);
      server_.attempts.erase(this);
      aborted = aborted_;
    }
    server_.in_flight.fetch_sub(1);
    {
      absl::MutexLock lock(&call_->mu_);  // Cancel() no longer reaches this attempt
      call_->attempt_ = nullptr;
    }
    std::shared_ptr<Relay> call = std::move(call_);
    Server& server = server_;
    delete this;
    call->AttemptDone(server, status, aborted);
  }

 private:
  std::shared_ptr<Relay> call_;  // keeps the call alive while an attempt runs
  Server& server_;
  std::unique_ptr<grpc::ClientContext> context_;
  internal::v1::AttentionGenerateResponse message_;
  bool aborted_ ABSL_GUARDED_BY(server_.mu) = false;
};

void AttentionServerPool::Relay::Cancel() {
  absl::MutexLock lock(&mu_);
  cancelled_ = true;
  if (attempt_ != nullptr) attempt_->TryCancel();
}

bool AttentionServerPool::Relay::Message(const internal::v1::AttentionGenerateResponse& message) {
  tokens_.fetch_add(message.token_ids_size());
  if (observer_->OnMessage(message)) return true;
  stopped_ = true;
  return false;
}

void AttentionServerPool::Relay::StartNext() {
  Attempt* attempt = nullptr;
  absl::Status done;
  {
    absl::MutexLock lock(&mu_);
    Server* server = cancelled_ ? nullptr : pool_.Pick(tried_);
    if (cancelled_) {
      done = absl::CancelledError("the request was cancelled");
    } else if (pool_.servers_.empty()) {
      done = absl::UnavailableError("no attention server configured");
    } else if (server == nullptr) {
      done = failures_.empty()
                 ? absl::UnavailableError(absl::StrCat("no attention server is available (",
                                                       pool_.NoneAvailable(), ")"))
                 : absl::UnavailableError(
                       absl::StrCat("no attention server could run the request (", failures_, ")"));
    } else {
      tried_[server->index] = true;
      attempt = attempt_ = new Attempt(shared_from_this(), *server);
    }
  }
  if (attempt == nullptr) return Done(done);
  attempt->Start();
}

void AttentionServerPool::Relay::AttemptDone(Server& server, const grpc::Status& grpc_status,
                                             bool aborted) {
  absl::Status status = rpc::FromGrpc(grpc_status);
  bool cancelled;
  {
    absl::MutexLock lock(&mu_);
    cancelled = cancelled_;
  }
  if (stopped_) return Done(absl::OkStatus());  // a stop string, or the client went away
  if (aborted && !cancelled) {
    status = absl::UnavailableError(absl::StrCat("attention server ", server.address, " is down (",
                                                 pool_.Reason(server.index), ")"));
  } else if (!status.ok()) {
    status = absl::Status(
        status.code(), absl::StrCat("attention server ", server.address, ": ", status.message()));
  }
  if (status.ok() || cancelled) return Done(status);
  if (const int64_t tokens = tokens_.load(); tokens > 0) {
    return Done(absl::Status(status.code(),
                             absl::StrCat("the request failed after ", tokens,
                                          " tokens were delivered (not retried: they were already "
                                          "sent): ",
                                          status.message())));
  }
  if (status.code() != absl::StatusCode::kUnavailable) return Done(status);
  {
    absl::MutexLock lock(&mu_);
    absl::StrAppend(&failures_, failures_.empty() ? "" : "; ", status.message());
  }
  if (pool_.health_ != nullptr) pool_.health_->CheckNow();
  StartNext();
}

AttentionServerPool::AttentionServerPool(const std::vector<std::string>& addresses,
                                         const rpc::TransportSecurity& security,
                                         rpc::HealthChecker* health)
    : health_(health) {
  for (const std::string& a : addresses) {
    auto s = std::make_unique<Server>();
    s->index = static_cast<int>(servers_.size());
    s->address = a;
    s->stub = internal::v1::AttentionService::NewStub(rpc::MakeChannel(a, security));
    servers_.push_back(std::move(s));
  }
}

AttentionServerPool::~AttentionServerPool() = default;

std::shared_ptr<AttentionServerPool::Call> AttentionServerPool::Generate(
    const grpc::CallbackServerContext& parent, internal::v1::AttentionGenerateRequest request,
    GenerateObserver* observer) {
  auto call = std::make_shared<Relay>(*this, parent, std::move(request), observer);
  call->StartNext();
  return call;
}

AttentionServerPool::Server* AttentionServerPool::Pick(const std::vector<bool>& tried) const {
  Server* best = nullptr;
  int best_rank = -1;
  for (const auto& s : servers_) {
    if (tried[s->index]) continue;
    const int rank = static_cast<int>(Health(s->index));  // kServing > kNotServing > kDown
    if (rank == static_cast<int>(rpc::TargetHealth::kDown)) continue;
    if (best == nullptr || rank > best_rank ||
        (rank == best_rank && s->in_flight.load() < best->in_flight.load())) {
      best = s.get();
      best_rank = rank;
    }
  }
  return best;
}

rpc::TargetHealth AttentionServerPool::Health(int index) const {
  return health_ == nullptr ? rpc::TargetHealth::kServing : health_->health(index);
}

std::string AttentionServerPool::Reason(int index) const {
  return health_ == nullptr ? "a health check failed" : health_->Reason(index);
}

std::string AttentionServerPool::NoneAvailable() const {
  std::string why;
  for (const auto& s : servers_)
    absl::StrAppend(&why, why.empty() ? "" : "; ", s->address, ": ", Reason(s->index));
  return why;
}

struct AttentionServerPool::InfoCall {
  std::chrono::system_clock::time_point deadline;
  ServingInfoDone done;
  std::vector<bool> tried;
  std::string failures;
  // One per ask (a finished call's context is not reused).
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  internal::v1::GetServingInfoRequest request;
  internal::v1::ServingInfo response;
};

void AttentionServerPool::GetServingInfo(const grpc::CallbackServerContext& parent,
                                         ServingInfoDone done) {
  auto call = std::make_shared<InfoCall>();
  // Not the parent's cancellation: a unary ask is short, and its deadline bounds it.
  call->deadline =
      std::min(parent.deadline(), std::chrono::system_clock::now() + std::chrono::seconds(10));
  call->done = std::move(done);
  call->tried.assign(servers_.size(), false);
  AskNext(std::move(call));
}

void AttentionServerPool::AskNext(std::shared_ptr<InfoCall> call) {
  Server* server = Pick(call->tried);
  if (server == nullptr) {
    return call->done(absl::UnavailableError(
        servers_.empty() ? "no attention server configured"
        : call->failures.empty()
            ? absl::StrCat("no attention server is available (", NoneAvailable(), ")")
            : absl::StrCat("no attention server answered (", call->failures, ")")));
  }
  call->tried[server->index] = true;
  grpc::ClientContext* context =
      call->contexts.emplace_back(std::make_unique<grpc::ClientContext>()).get();
  context->set_deadline(call->deadline);
  server->stub->async()->GetServingInfo(
      context, &call->request, &call->response, [this, call, server](grpc::Status s) {
        if (s.ok()) return call->done(std::move(call->response));
        const std::string message =
            absl::StrCat("attention server ", server->address, ": ", s.error_message());
        if (s.error_code() != grpc::StatusCode::UNAVAILABLE) {
          return call->done(absl::Status(static_cast<absl::StatusCode>(s.error_code()), message));
        }
        absl::StrAppend(&call->failures, call->failures.empty() ? "" : "; ", message);
        AskNext(call);
      });
}

void AttentionServerPool::OnHealthChange(int index, rpc::TargetHealth now) {
  if (now != rpc::TargetHealth::kDown) return;
  Server& s = *servers_[index];
  absl::MutexLock lock(&s.mu);
  for (Attempt* attempt : s.attempts) attempt->AbortLocked();
}

}  // namespace dsmoe
