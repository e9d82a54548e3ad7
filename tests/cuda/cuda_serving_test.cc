// The attention server's scheduler on a GPU (CreateBatchRunner with cuda:0): its logits against
// the CPU scheduler's, continuous batching with more sequences than slots (every finished
// sequence's KV pages are freed for the next), and the CPU attention side with routed experts
// on the GPU: in process, and through an expert server on the GPU over real gRPC (its placement
// changes: tests/expert_service_test.cc). Skipped without a GPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>

#include "attention-server/batch_runner_factory.h"
#include "core/model/cuda/cuda_expert_executor.h"
#include "core/model/cuda/cuda_model_runner.h"
#include "core/model/make_model.h"
#include "core/rpc/server.h"
#include "expert-server/client/expert_dispatcher.h"
#include "expert-server/client/expert_server_pool.h"
#include "expert-server/client/nccl_links.h"
#include "expert-server/expert_service.h"
#include "expert-server/expert_store.h"
#include "router/placement.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

// Teacher-forced logits of `ids` through two schedulers agree (bf16 GPU vs fp32 CPU bounds).
void ExpectSameLogits(Scheduler& got, Scheduler& want, const std::vector<int32_t>& ids, int64_t V,
                      const char* label) {
  auto a = got.ComputeLogits(ids);
  auto b = want.ComputeLogits(ids);
  ASSERT_TRUE(a.ok() && b.ok());
  const testing::Agreement ag = testing::Compare(*a, *b, V);
  std::printf("[%s] logits rel-L2 %.3g top-1 %.3f\n", label, ag.rel_err, ag.top1);
  EXPECT_LT(ag.rel_err, 2e-2) << label;
  EXPECT_GE(ag.top1, 0.95) << label;
}

// Collects one sequence's tokens and its end.
class Collector final : public SequenceSink {
 public:
  void OnToken(int32_t id) override {
    std::lock_guard<std::mutex> lock(mu_);
    tokens_.push_back(id);
  }
  void OnFinish(FinishReason reason, const absl::Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    reason_ = reason;
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    ASSERT_TRUE(cv_.wait_for(lock, std::chrono::seconds(120), [&] { return done_; }));
  }
  std::vector<int32_t> tokens() {
    std::lock_guard<std::mutex> lock(mu_);
    return tokens_;
  }
  FinishReason reason() {
    std::lock_guard<std::mutex> lock(mu_);
    return reason_;
  }
  absl::Status status() {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> tokens_;
  FinishReason reason_ = FinishReason::kStop;
  absl::Status status_;
  bool done_ = false;
};

TEST(GpuServing, SchedulerOnGpuMatchesCpuAndRecyclesSlots) {
  DSMOE_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto w = testing::WriteAndLoad(dir, "small", DType::kBF16, 5);
  const int64_t V = w->config().vocab_size;
  ThreadPool pool(4);
  SchedulerOptions o;
  o.num_slots = 3;
  o.max_batch_tokens = 64;
  o.max_context = 128;
  auto gpu_runner = CreateBatchRunner(Device{Device::Kind::kCuda, 0}, *w, pool, o, nullptr);
  ASSERT_TRUE(gpu_runner.ok()) << gpu_runner.status();
  auto* cuda_runner = dynamic_cast<cuda::CudaModelRunner*>(gpu_runner->get());
  ASSERT_NE(cuda_runner, nullptr);
  const int64_t all_pages = cuda_runner->kv_cache().num_free_pages();
  auto gpu = Scheduler::Create(std::move(*gpu_runner), o);
  auto cpu = Scheduler::Create(*w, pool, o);
  ASSERT_TRUE(gpu.ok() && cpu.ok());

  // Teacher-forced logits of a 100-token prompt (two 64-token chunks) through each scheduler.
  std::vector<int32_t> ids(100);
  for (int i = 0; i < 100; ++i) ids[i] = static_cast<int32_t>((i * 7919 + 3) % V);
  ExpectSameLogits(**gpu, **cpu, ids, V, "gpu-scheduler-vs-cpu");

  // Eight greedy sequences through three slots: queued ones start as others finish.
  std::vector<std::shared_ptr<Collector>> sinks;
  for (int s = 0; s < 8; ++s) {
    SequenceParams p;
    for (int i = 0; i < 5 + s; ++i)
      p.prompt.push_back(static_cast<int32_t>((s * 131 + i * 17) % V));
    p.max_tokens = 12;
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE((*gpu)->Submit(std::move(p), sinks.back()).ok());
  }
  for (auto& sink : sinks) {
    sink->Wait();
    EXPECT_TRUE(sink->status().ok()) << sink->status();
    EXPECT_EQ(sink->reason(), FinishReason::kLength);
    EXPECT_EQ(sink->tokens().size(), 12u);
  }
  // running == 0 is published after the last slot was released (under the scheduler's lock).
  for (int i = 0; i < 100 && (*gpu)->GetLoad().running > 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ((*gpu)->GetLoad().running, 0);
  EXPECT_EQ(cuda_runner->kv_cache().num_free_pages(), all_pages) << "a finished slot kept pages";
}

TEST(GpuServing, CpuAttentionWithGpuExpertsMatchesCpu) {
  DSMOE_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto w = testing::WriteAndLoad(dir, "small", DType::kBF16, 5);
  const int64_t V = w->config().vocab_size;
  ThreadPool pool(4);
  SchedulerOptions o;
  o.num_slots = 2;
  o.max_batch_tokens = 64;
  o.max_context = 128;
  auto experts = cuda::CudaExpertExecutor::Create(*w, 0, o.max_batch_tokens);
  ASSERT_TRUE(experts.ok()) << experts.status();
  auto with_gpu_experts = Scheduler::Create(*w, pool, o, experts->get());
  auto cpu = Scheduler::Create(*w, pool, o);
  ASSERT_TRUE(with_gpu_experts.ok() && cpu.ok());
  std::vector<int32_t> ids(90);
  for (int i = 0; i < 90; ++i) ids[i] = static_cast<int32_t>((i * 104729 + 11) % V);
  ExpectSameLogits(**with_gpu_experts, **cpu, ids, V, "cpu-attention+gpu-experts vs cpu");
}

// An expert server as dsmoe-expert-server --device cuda:N runs it: its experts opened on GPU N.
std::unique_ptr<ExpertService> GpuExpertService(const std::string& dir,
                                                const WeightSelection& selection,
                                                int64_t max_tokens, int device = 0) {
  ExpertStoreOptions so;
  so.device = Device{Device::Kind::kCuda, device};
  so.model_dir = dir;
  so.max_tokens = max_tokens;
  auto store = OpenExpertStore(so, selection);
  EXPECT_TRUE(store.ok()) << store.status();
  if (!store.ok()) return nullptr;
  return std::make_unique<ExpertService>(std::move(*store), ExpertServiceOptions{});
}

// NCCL's bootstrap sockets (listening for the peer, and joining) stay on loopback. Read once,
// when NCCL first initialises.
void KeepNcclOnLoopback() { setenv("NCCL_SOCKET_IFNAME", "lo", 0); }

// Runs without a GPU: NCCL is found at run time, or the reason is clear; joining needs a GPU.
TEST(NcclChannel, LoadsAtRunTimeOrSaysWhy) {
  KeepNcclOnLoopback();
  absl::StatusOr<std::string> a = nccl::NewUniqueId(), b = nccl::NewUniqueId();
  if (!a.ok()) {
    EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition) << a.status();
    EXPECT_THAT(std::string(a.status().message()), ::testing::HasSubstr("cannot load NCCL"));
    GTEST_SKIP() << a.status();
  }
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(a->size(), 128u);
  EXPECT_NE(*a, *b) << "two channels got the same id";
  auto bad = nccl::Channel::Join("short", 0, 0, std::chrono::steady_clock::now());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument) << bad.status();
  if (!testing::NoGpuReason().empty()) {
    auto no_gpu = nccl::Channel::Join(*a, 0, 0, std::chrono::steady_clock::now());
    EXPECT_EQ(no_gpu.status().code(), absl::StatusCode::kFailedPrecondition) << no_gpu.status();
    EXPECT_THAT(std::string(no_gpu.status().message()), ::testing::HasSubstr("no CUDA device"));
  }
}

int NumGpus() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

// A CPU attention side whose routed experts are on an expert server on GPU `expert_gpu`, over
// real gRPC on 127.0.0.1; with `nccl_gpu` >= 0 its dispatch also moves hidden states and outputs
// through NcclLinks from that GPU (the routing and status still by gRPC). The logits must match
// the CPU engine's whatever the transport. Returns how many NCCL channels opened (-1: the
// expert server did not start).
int ServeThroughGpuExpertServer(int expert_gpu, int nccl_gpu, const char* label) {
  KeepNcclOnLoopback();
  testing::TempDir dir;
  auto w = testing::WriteAndLoad(dir, "small", DType::kBF16, 8);
  const ModelConfig& c = w->config();
  auto placement = router::Placement::Compute(c, 1, 1, router::Placement::Strategy::kRoundRobin);
  EXPECT_TRUE(placement.ok());
  auto service = GpuExpertService(dir.path(), placement->SelectionFor(0), 64, expert_gpu);
  if (service == nullptr) return -1;
  rpc::ServerOptions so;
  so.security = rpc::TransportSecurity::Insecure();
  auto server = rpc::StartServer(so, {static_cast<grpc::Service*>(service.get())});
  EXPECT_TRUE(server.ok()) << server.status();
  ExpertServerPoolOptions po;
  po.security = rpc::TransportSecurity::Insecure();
  ExpertServerPool expert_servers({server->address()}, po);
  ExpertDispatcherOptions eo;
  std::unique_ptr<NcclLinks> links;
  if (nccl_gpu >= 0) {
    NcclLinksOptions lo;
    lo.device = nccl_gpu;
    lo.hidden = c.hidden_size;
    lo.max_rows = 64;
    links = std::make_unique<NcclLinks>(expert_servers, lo);
    links->ChannelTo(0);  // starts the set-up; dispatch uses gRPC until it is done
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (links->num_opening() > 0 && std::chrono::steady_clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    EXPECT_EQ(links->num_opening(), 0) << "the set-up did not end within its timeout";
    eo.side_channel = links.get();
  }
  const int open = links != nullptr ? links->num_open() : 0;
  ExpertDispatcher remote(c, *placement, expert_servers, eo);
  ThreadPool pool(4);
  SchedulerOptions o;
  o.num_slots = 2;
  o.max_batch_tokens = 64;
  o.max_context = 128;
  auto remote_experts = Scheduler::Create(*w, pool, o, &remote);
  auto cpu = Scheduler::Create(*w, pool, o);
  EXPECT_TRUE(remote_experts.ok() && cpu.ok());
  std::vector<int32_t> ids(90);
  for (int i = 0; i < 90; ++i) ids[i] = static_cast<int32_t>((i * 6007 + 5) % c.vocab_size);
  ExpectSameLogits(**remote_experts, **cpu, ids, c.vocab_size, label);
  if (links != nullptr) {
    EXPECT_EQ(links->num_open(), open) << "a channel closed while serving";
  }
  server->server->Shutdown();
  return open;
}

TEST(GpuServing, ExpertServerOnGpuServesCpuAttentionOverGrpc) {
  DSMOE_SKIP_WITHOUT_GPU();
  EXPECT_EQ(ServeThroughGpuExpertServer(0, -1, "cpu-attention+gpu-expert-server vs cpu"), 0);
}

TEST(GpuServing, NcclTransportBetweenTwoGpusMatchesCpu) {
  DSMOE_SKIP_WITHOUT_GPU();
  if (NumGpus() < 2) GTEST_SKIP() << "needs 2 GPUs (NCCL refuses two ranks on one device)";
  EXPECT_EQ(ServeThroughGpuExpertServer(1, 0, "nccl gpu0 -> expert server gpu1 vs cpu"), 1)
      << "the channel did not open";
}

// Both ranks on one GPU: NCCL is expected to refuse the channel ("duplicate GPU"), and then
// dispatch carries the tensors by gRPC; either way the logits match.
TEST(GpuServing, NcclTransportOnOneGpuServesEitherWay) {
  DSMOE_SKIP_WITHOUT_GPU();
  const int open = ServeThroughGpuExpertServer(0, 0, "nccl on one gpu vs cpu");
  std::printf("[gpu] NCCL channels opened with both ranks on GPU 0: %d\n", open);
  EXPECT_GE(open, 0) << "the GPU expert server did not start";
}

}  // namespace
}  // namespace dsmoe
