#include "tests/in_process_cluster.h"

#include "absl/strings/str_cat.h"
#include "core/model/generator.h"
#include "core/model/model_runner.h"
#include "core/rpc/grpc_status.h"
#include "core/rpc/server.h"

namespace dsmoe::testing {

namespace {

// Short health checks, one failure takes a target out: the tests wait for what they cause
// (an expert server gone or back) within a few hundred milliseconds.
rpc::HealthCheckOptions FastHealthChecks() {
  rpc::HealthCheckOptions o;
  o.period = std::chrono::milliseconds(50);
  o.timeout = std::chrono::milliseconds(1000);
  o.failure_threshold = 1;
  return o;
}

}  // namespace

bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return true;
}

absl::StatusOr<std::unique_ptr<ExpertServer>> InProcessCluster::CreateExpertServer(
    int i, const std::string& listen) const {
  ExpertServerOptions o;
  o.model_dir = options_.model_dir;
  o.placement_file = options_.placement_file;
  o.num_servers = options_.num_expert_servers;
  o.num_replicas = options_.num_replicas;
  o.server_index = i;
  o.store.threads = 1;  // the machine running the tests is small and shared
  o.tls.insecure = true;
  o.serving.listen = listen;
  o.serving.metrics_listen = "";
  return ExpertServer::Create(o);
}

absl::StatusOr<std::unique_ptr<InProcessCluster>> InProcessCluster::Start(
    InProcessClusterOptions options) {
  std::unique_ptr<InProcessCluster> c(new InProcessCluster());
  c->options_ = std::move(options);
  for (int i = 0; i < c->options_.num_expert_servers; ++i) {
    DSMOE_ASSIGN_OR_RETURN(auto expert, c->CreateExpertServer(i, "127.0.0.1:0"));
    c->expert_addresses_.push_back(expert->address());
    c->experts_.push_back(std::move(expert));
  }

  AttentionServerOptions a;
  a.model_dir = c->options_.model_dir;
  a.expert_servers = c->expert_addresses_;
  a.placement_file = c->options_.placement_file;
  a.num_replicas = c->options_.num_replicas;
  a.micro_batches = c->options_.micro_batches;
  a.threads = 1;
  a.scheduler.num_slots = 8;
  a.scheduler.max_batch_tokens = 64;
  a.expert_health = FastHealthChecks();
  a.tls.insecure = true;
  a.serving.metrics_listen = "";
  DSMOE_ASSIGN_OR_RETURN(c->attention_, AttentionServer::Create(a));
  if (!WaitFor([&] { return c->attention_->ready(); }, std::chrono::seconds(20))) {
    return absl::DeadlineExceededError(
        "the attention server did not find a serving holder of every routed expert in 20 s");
  }

  GatewayServerOptions g;
  g.model_dir = c->options_.model_dir;
  g.attention_servers = {c->attention_->address()};
  g.server.security = rpc::TransportSecurity::Insecure();
  g.gateway.upstream_security = rpc::TransportSecurity::Insecure();
  g.no_auth = true;
  g.health = FastHealthChecks();
  DSMOE_ASSIGN_OR_RETURN(c->gateway_, GatewayServer::Create(g));

  c->gateway_stub_ = dsmoe::v1::Gateway::NewStub(
      grpc::CreateChannel(c->gateway_->address(), grpc::InsecureChannelCredentials()));
  c->attention_stub_ = internal::v1::AttentionService::NewStub(
      rpc::MakeChannel(c->attention_->address(), rpc::TransportSecurity::Insecure()));
  return c;
}

InProcessCluster::~InProcessCluster() {
  gateway_stub_.reset();
  gateway_.reset();
  attention_stub_.reset();
  attention_.reset();
  for (auto it = experts_.rbegin(); it != experts_.rend(); ++it) it->reset();
}

void InProcessCluster::StopExpertServer(int i) {
  if (experts_[i] == nullptr) return;
  experts_[i]->Shutdown();
  experts_[i].reset();
}

absl::Status InProcessCluster::RestartExpertServer(int i) {
  if (experts_[i] != nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("expert server ", i, " is running"));
  }
  DSMOE_ASSIGN_OR_RETURN(experts_[i], CreateExpertServer(i, expert_addresses_[i]));
  return absl::OkStatus();
}

absl::StatusOr<internal::v1::LoadReport> InProcessCluster::AttentionLoad() {
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  internal::v1::LoadReport load;
  const grpc::Status s = attention_stub_->GetLoad(&context, internal::v1::GetLoadRequest(), &load);
  if (!s.ok()) return rpc::FromGrpc(s, "GetLoad");
  return load;
}

namespace {

// Records, per MoE layer, the routed experts and gate logits of every position in the order
// computed.
class RoutingRecorder final : public RoutingObserver {
 public:
  explicit RoutingRecorder(SingleProcessEngine::Run* out) : out_(out) {}
  void OnGateLogits(int64_t layer, int64_t T, int64_t num_experts, const float* logits) override {
    for (int64_t t = 0; t < T; ++t)
      out_->gate_logits[layer].emplace_back(logits + t * num_experts,
                                            logits + (t + 1) * num_experts);
  }
  void OnRouting(int64_t layer, int64_t T, int64_t k, const int32_t* experts,
                 const float* /*weights*/) override {
    for (int64_t t = 0; t < T; ++t)
      out_->routing[layer].emplace_back(experts + t * k, experts + (t + 1) * k);
  }

 private:
  SingleProcessEngine::Run* out_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<SingleProcessEngine>> SingleProcessEngine::Load(
    const std::string& model_dir) {
  DSMOE_ASSIGN_OR_RETURN(auto weights, ModelWeights::Load(model_dir));
  return std::unique_ptr<SingleProcessEngine>(new SingleProcessEngine(std::move(weights)));
}

absl::StatusOr<SingleProcessEngine::Run> SingleProcessEngine::Generate(
    const std::vector<uint32_t>& prompt, int64_t max_tokens) {
  RunnerOptions limits;
  limits.max_context = static_cast<int64_t>(prompt.size()) + max_tokens;
  DSMOE_ASSIGN_OR_RETURN(auto runner, ModelRunner::Create(*weights_, pool_, limits));
  Run run;
  RoutingRecorder recorder(&run);
  runner->set_routing_observer(&recorder);
  GenerateRequest request;
  request.prompt.assign(prompt.begin(), prompt.end());
  request.max_tokens = max_tokens;
  request.ignore_eos = true;  // sampling: greedy by default
  DSMOE_ASSIGN_OR_RETURN(GenerateResult result,
                         dsmoe::Generate(*runner, weights_->generation_config(), request));
  run.ids.assign(result.output_ids.begin(), result.output_ids.end());
  return run;
}

dsmoe::v1::GenerateRequest GreedyRequest(const std::vector<uint32_t>& prompt, uint32_t max_tokens) {
  dsmoe::v1::GenerateRequest r;
  r.mutable_token_ids()->mutable_ids()->Add(prompt.begin(), prompt.end());
  r.set_max_tokens(max_tokens);
  r.set_temperature(0);
  r.set_ignore_eos(true);
  return r;
}

Stream::Stream(dsmoe::v1::Gateway::Stub& stub, const dsmoe::v1::GenerateRequest& request,
               std::chrono::milliseconds deadline) {
  context_.set_deadline(std::chrono::system_clock::now() + deadline);
  reader_ = std::thread(&Stream::Read, this, stub.Generate(&context_, request));
}

Stream::~Stream() {
  context_.TryCancel();
  if (reader_.joinable()) reader_.join();
}

void Stream::Read(std::unique_ptr<grpc::ClientReader<dsmoe::v1::GenerateResponse>> reader) {
  dsmoe::v1::GenerateResponse m;
  while (reader->Read(&m)) {
    std::lock_guard<std::mutex> lock(mu_);
    result_.ids.insert(result_.ids.end(), m.token_ids().begin(), m.token_ids().end());
    result_.text += m.text();
    if (m.finish_reason() != dsmoe::v1::FINISH_REASON_UNSPECIFIED) {
      result_.finish_reason = m.finish_reason();
      result_.completion_tokens = m.usage().completion_tokens();
    }
    changed_.notify_all();
  }
  grpc::Status status = reader->Finish();
  std::lock_guard<std::mutex> lock(mu_);
  result_.status = std::move(status);
  done_ = true;
  changed_.notify_all();
}

bool Stream::WaitForTokens(size_t n, std::chrono::milliseconds timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait_for(lock, timeout, [&] { return done_ || result_.ids.size() >= n; });
  return result_.ids.size() >= n;
}

size_t Stream::num_tokens() {
  std::lock_guard<std::mutex> lock(mu_);
  return result_.ids.size();
}

const Stream::Result& Stream::Wait() {
  if (reader_.joinable()) reader_.join();  // ends by the call's deadline at the latest
  return result_;
}

}  // namespace dsmoe::testing
