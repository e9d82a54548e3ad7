// A whole dsmoe cluster inside the test process, for unit-level tests of what the services do
// together: expert servers, one attention server and a gateway (the real server classes) on
// ephemeral 127.0.0.1 ports, plain text, short health checks, and a real gRPC client of the
// public API (dsmoe.v1.Gateway). Beside it the independent reference: the single-process engine
// (core/model/generator.h, routed experts computed locally) on the same checkpoint.
//
// Thread-compatible: one test thread drives a cluster; a Stream reads on a thread of its own.
#pragma once

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "attention-server/attention_server.h"
#include "core/model/weights.h"
#include "core/util/status.h"
#include "core/util/thread_pool.h"
#include "dsmoe/internal/v1/attention.grpc.pb.h"
#include "dsmoe/v1/gateway.grpc.pb.h"
#include "expert-server/expert_server.h"
#include "gateway/gateway_server.h"

namespace dsmoe::testing {

// Polls `done` every 10 ms until it holds or `timeout` passes; false on timeout.
bool WaitFor(const std::function<bool()>& done, std::chrono::milliseconds timeout);

struct InProcessClusterOptions {
  std::string model_dir;  // the checkpoint every server loads (required)
  int num_expert_servers = 2;
  // Without a placement file: round-robin over the expert servers, this many copies of each.
  int num_replicas = 1;
  std::string placement_file;  // "": round-robin
  int micro_batches = 1;       // the attention server's --micro-batches (its default)
};

class InProcessCluster {
 public:
  // Starts the expert servers, then the attention server (waiting until it is ready: every
  // routed expert has a serving holder), then the gateway, and connects a client to it.
  static absl::StatusOr<std::unique_ptr<InProcessCluster>> Start(InProcessClusterOptions options);
  // The gateway first, then the attention server, then the expert servers: each stops before
  // what it calls.
  ~InProcessCluster();

  dsmoe::v1::Gateway::Stub& gateway() { return *gateway_stub_; }
  AttentionServer& attention() { return *attention_; }

  // Shuts expert server `i` down and destroys it: its port closes, as a killed process's would.
  void StopExpertServer(int i);
  // Starts expert server `i` again on the address it had (the attention server's health
  // checks find it there).
  absl::Status RestartExpertServer(int i);

  // The attention server's own account of its sequences (AttentionService.GetLoad).
  absl::StatusOr<internal::v1::LoadReport> AttentionLoad();

 private:
  InProcessCluster() = default;
  absl::StatusOr<std::unique_ptr<ExpertServer>> CreateExpertServer(int i,
                                                                   const std::string& listen) const;

  InProcessClusterOptions options_;
  std::vector<std::string> expert_addresses_;
  // Declared in start order; the destructor resets them in reverse.
  std::vector<std::unique_ptr<ExpertServer>> experts_;
  std::unique_ptr<AttentionServer> attention_;
  std::unique_ptr<GatewayServer> gateway_;
  std::unique_ptr<dsmoe::v1::Gateway::Stub> gateway_stub_;
  std::unique_ptr<internal::v1::AttentionService::Stub> attention_stub_;
};

// The single-process engine on `model_dir` (every weight loaded, routed experts local): greedy
// tokens, and which routed experts each computed position chose in each MoE layer.
class SingleProcessEngine {
 public:
  static absl::StatusOr<std::unique_ptr<SingleProcessEngine>> Load(const std::string& model_dir);

  struct Run {
    std::vector<uint32_t> ids;  // the generated tokens
    // MoE layer -> per computed position (the prompt, then every generated token but the last,
    // which is never fed back) -> the routed experts it chose.
    std::map<int64_t, std::vector<std::set<int32_t>>> routing;
    // The same positions' gate logits over every routed expert: how clear each choice was.
    std::map<int64_t, std::vector<std::vector<float>>> gate_logits;
  };
  // Greedy, ignoring end-of-sequence tokens: what a cluster must answer token for token.
  absl::StatusOr<Run> Generate(const std::vector<uint32_t>& prompt, int64_t max_tokens);

 private:
  explicit SingleProcessEngine(std::unique_ptr<ModelWeights> weights)
      : weights_(std::move(weights)), pool_(1) {}
  std::unique_ptr<ModelWeights> weights_;
  ThreadPool pool_;
};

// A greedy request for `max_tokens` tokens of `prompt`, ignoring end-of-sequence tokens.
dsmoe::v1::GenerateRequest GreedyRequest(const std::vector<uint32_t>& prompt, uint32_t max_tokens);

// One streaming Generate read on a thread of its own, so a test can act while it runs.
class Stream {
 public:
  struct Result {
    grpc::Status status;
    std::vector<uint32_t> ids;
    std::string text;  // the pieces concatenated
    dsmoe::v1::FinishReason finish_reason = dsmoe::v1::FINISH_REASON_UNSPECIFIED;
    uint32_t completion_tokens = 0;  // from the last message's usage
  };

  // The call's deadline bounds the whole stream.
  Stream(dsmoe::v1::Gateway::Stub& stub, const dsmoe::v1::GenerateRequest& request,
         std::chrono::milliseconds deadline);
  ~Stream();  // cancels the call if it still runs, and joins the reader
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;

  // Waits until `n` tokens arrived or the stream ended; true if `n` arrived.
  bool WaitForTokens(size_t n, std::chrono::milliseconds timeout);
  size_t num_tokens();
  void Cancel() { context_.TryCancel(); }
  // Waits for the end (the deadline bounds it) and returns the outcome.
  const Result& Wait();

 private:
  void Read(std::unique_ptr<grpc::ClientReader<dsmoe::v1::GenerateResponse>> reader);

  grpc::ClientContext context_;
  std::mutex mu_;
  std::condition_variable changed_;
  Result result_;      // guarded by mu_ until done_
  bool done_ = false;  // guarded by mu_
  std::thread reader_;
};

}  // namespace dsmoe::testing
