// The attention server's scheduler on a GPU (CreateBatchRunner with cuda:0): its logits against
// the CPU scheduler's, continuous batching with more sequences than slots (every finished
// sequence's KV pages are freed for the next), and the CPU attention side with routed experts
// on the GPU. Skipped without a GPU.
#include <gtest/gtest.h>

#include <condition_variable>
#include <mutex>

#include "attention-server/batch_runner_factory.h"
#include "core/model/cuda/cuda_expert_executor.h"
#include "core/model/cuda/cuda_model_runner.h"
#include "core/model/make_model.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using testing::RelErr;

std::unique_ptr<ModelWeights> WriteAndLoad(const testing::TempDir& dir, const std::string& preset) {
  const absl::Status s =
      WriteRandomCheckpoint(*PresetConfig(preset), {DType::kBF16, 5, 1}, dir.path());
  EXPECT_TRUE(s.ok()) << s;
  auto w = ModelWeights::Load(dir.path());
  EXPECT_TRUE(w.ok()) << w.status();
  return std::move(*w);
}

// Top-1 agreement of two [rows, V] logit arrays.
double Top1(const std::vector<float>& a, const std::vector<float>& b, int64_t V) {
  int64_t same = 0, rows = static_cast<int64_t>(a.size()) / V;
  for (int64_t r = 0; r < rows; ++r) {
    const auto ra = a.begin() + r * V, rb = b.begin() + r * V;
    same += std::max_element(ra, ra + V) - ra == std::max_element(rb, rb + V) - rb;
  }
  return static_cast<double>(same) / static_cast<double>(rows);
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
  auto w = WriteAndLoad(dir, "small");
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
  auto lg = (*gpu)->ComputeLogits(ids);
  auto lc = (*cpu)->ComputeLogits(ids);
  ASSERT_TRUE(lg.ok() && lc.ok());
  const double err = RelErr(*lg, *lc), top1 = Top1(*lg, *lc, V);
  std::printf("[gpu-scheduler-vs-cpu] logits rel-L2 %.3g top-1 %.3f\n", err, top1);
  EXPECT_LT(err, 2e-2);
  EXPECT_GE(top1, 0.95);

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
  auto w = WriteAndLoad(dir, "small");
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
  auto a = (*with_gpu_experts)->ComputeLogits(ids);
  auto b = (*cpu)->ComputeLogits(ids);
  ASSERT_TRUE(a.ok() && b.ok());
  const double err = RelErr(*a, *b), top1 = Top1(*a, *b, V);
  std::printf("[cpu-attention+gpu-experts vs cpu] logits rel-L2 %.3g top-1 %.3f\n", err, top1);
  EXPECT_LT(err, 2e-2);
  EXPECT_GE(top1, 0.95);
}

}  // namespace
}  // namespace dsmoe
