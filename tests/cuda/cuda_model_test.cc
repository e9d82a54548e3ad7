// The GPU model runner against the CPU engine (ModelRunner) on checkpoints the test writes, the
// GPU expert executor against LocalExpertExecutor, KV-cache decode (CUDA graphs) against
// recomputing from scratch, and a clear error where there is no GPU.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <numeric>

#include "core/model/cuda/cuda_expert_executor.h"
#include "core/model/cuda/cuda_model_runner.h"
#include "core/model/make_model.h"
#include "core/model/model_runner.h"
#include "core/model/sampler.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using testing::Agreement;
using testing::Compare;
using ::testing::HasSubstr;
using testing::RelErr;
using testing::WriteAndLoad;

std::vector<int32_t> Prompt(int64_t n, int64_t vocab, int salt) {
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i)
    ids[i] = static_cast<int32_t>((i * 7919 + salt * 131 + 3) % vocab);
  return ids;
}

TEST(CudaWithoutGpu, CreateFailsWithAClearStatus) {
  if (testing::NoGpuReason().empty())
    GTEST_SKIP() << "a GPU is present; this checks the machines without one";
  testing::TempDir dir;
  auto w = WriteAndLoad(dir, "tiny", DType::kBF16);
  auto runner = cuda::CudaModelRunner::Create(*w, {});
  ASSERT_FALSE(runner.ok());
  EXPECT_EQ(runner.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(runner.status().message()), HasSubstr("no CUDA device"));
  auto ex = cuda::CudaExpertExecutor::Create(*w, 0, 8);
  ASSERT_FALSE(ex.ok());
  EXPECT_EQ(ex.status().code(), absl::StatusCode::kFailedPrecondition);
}

// With or without a GPU: a gate the GPU does not compute (core/model/gate.h,
// CheckGpuGateSupports) is refused before the device is touched, naming the config key.
TEST(CudaGate, CreateRefusesAGateItWouldComputeDifferently) {
  for (const bool group_limited : {true, false}) {
    testing::TempDir dir;
    ModelConfig c = *PresetConfig("tiny");  // 16 routed experts, top-4
    if (group_limited) {
      c.topk_method = "group_limited_greedy";
      c.n_group = 4;
      c.topk_group = 2;
    } else {
      c.routed_scaling_factor = 2.0;
    }
    ASSERT_TRUE(WriteRandomCheckpoint(c, {DType::kBF16, 3, 1}, dir.path()).ok());
    auto w = ModelWeights::Load(dir.path());
    ASSERT_TRUE(w.ok()) << w.status();
    auto runner = cuda::CudaModelRunner::Create(**w, {});
    ASSERT_FALSE(runner.ok());
    EXPECT_EQ(runner.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(runner.status().message()),
                HasSubstr(group_limited ? "group_limited_greedy" : "routed_scaling_factor"));
  }
}

class CudaModelTest : public ::testing::TestWithParam<std::pair<std::string, DType>> {};

// The GPU runner against the CPU runner: a prompt of two sequences batched together (all
// logits), then 8 decode steps of both (graph replays).
TEST_P(CudaModelTest, MatchesCpuEngine) {
  DSMOE_SKIP_WITHOUT_GPU();
  const auto& [preset, dtype] = GetParam();
  testing::TempDir dir;
  auto w = WriteAndLoad(dir, preset, dtype);
  const int64_t V = w->config().vocab_size;
  ThreadPool pool(8);
  RunnerOptions cpu_o;
  cpu_o.num_slots = 2;
  cpu_o.max_context = 128;
  cpu_o.max_batch_tokens = 64;
  auto cpu = ModelRunner::Create(*w, pool, cpu_o);
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  cuda::CudaRunnerOptions gpu_o;
  gpu_o.num_slots = 2;
  gpu_o.max_context = 128;
  gpu_o.max_batch_tokens = 64;
  gpu_o.page_size = 8;
  auto gpu = cuda::CudaModelRunner::Create(*w, gpu_o);
  ASSERT_TRUE(gpu.ok()) << gpu.status();

  const std::vector<int32_t> a = Prompt(29, V, 1), b = Prompt(13, V, 2);
  std::vector<int32_t> ids, slots, pos, rows;
  for (size_t i = 0; i < a.size(); ++i) {
    ids.push_back(a[i]);
    slots.push_back(0);
    pos.push_back(static_cast<int32_t>(i));
  }
  for (size_t i = 0; i < b.size(); ++i) {
    ids.push_back(b[i]);
    slots.push_back(1);
    pos.push_back(static_cast<int32_t>(i));
  }
  rows.resize(ids.size());
  std::iota(rows.begin(), rows.end(), 0);
  std::vector<float> want(ids.size() * V), got(ids.size() * V);
  ASSERT_TRUE((*cpu)->Forward({ids, slots, pos, rows}, want.data()).ok());
  const absl::Status s = (*gpu)->Forward({ids, slots, pos, rows}, got.data());
  ASSERT_TRUE(s.ok()) << s;
  std::vector<float> all_got = got, all_want = want;

  // Decode: both sequences step together, fed the CPU's greedy tokens so both stay on one path.
  std::vector<int32_t> next = {ArgMax(want.data() + (a.size() - 1) * V, V),
                               ArgMax(want.data() + (ids.size() - 1) * V, V)};
  std::vector<int32_t> step_pos = {static_cast<int32_t>(a.size()), static_cast<int32_t>(b.size())};
  const std::vector<int32_t> step_slots = {0, 1}, step_rows = {0, 1};
  for (int step = 0; step < 8; ++step) {
    std::vector<float> w2(2 * V), g2(2 * V);
    ASSERT_TRUE((*cpu)->Forward({next, step_slots, step_pos, step_rows}, w2.data()).ok());
    const absl::Status st = (*gpu)->Forward({next, step_slots, step_pos, step_rows}, g2.data());
    ASSERT_TRUE(st.ok()) << st;
    all_want.insert(all_want.end(), w2.begin(), w2.end());
    all_got.insert(all_got.end(), g2.begin(), g2.end());
    next = {ArgMax(w2.data(), V), ArgMax(w2.data() + V, V)};
    step_pos[0]++;
    step_pos[1]++;
  }
  EXPECT_GE((*gpu)->num_graphs(), 1);  // the decode steps (and the all-logits prefill)
  const Agreement prefill = Compare(got, want, V), overall = Compare(all_got, all_want, V);
  std::printf(
      "[gpu-vs-cpu] %s %s: prefill rel-L2 %.3g top-1 %.3f; with decode rel-L2 %.3g top-1 %.3f\n",
      preset.c_str(), std::string(DTypeName(dtype)).c_str(), prefill.rel_err, prefill.top1,
      overall.rel_err, overall.top1);
  ::testing::Test::RecordProperty("rel_err", std::to_string(overall.rel_err));
  ::testing::Test::RecordProperty("top1", std::to_string(overall.top1));
  // bf16 weights and activations against fp32: ~1e-2; a wrong kernel gives O(1).
  EXPECT_LT(overall.rel_err, 0.08);
  EXPECT_GE(overall.top1, 0.85);
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaModelTest,
                         ::testing::Values(std::pair<std::string, DType>{"tiny", DType::kBF16},
                                           std::pair<std::string, DType>{"tiny", DType::kF32},
                                           std::pair<std::string, DType>{"gshard", DType::kBF16},
                                           std::pair<std::string, DType>{"small", DType::kBF16}),
                         [](const auto& param_info) {
                           return param_info.param.first + "_" +
                                  std::string(DTypeName(param_info.param.second));
                         });

// Decode through the paged cache (graph replays) equals one recomputation from scratch.
TEST(CudaModelRunner, KvCacheDecodeEqualsRecompute) {
  DSMOE_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto w = WriteAndLoad(dir, "small", DType::kBF16);
  const int64_t V = w->config().vocab_size;
  cuda::CudaRunnerOptions o;
  o.num_slots = 3;
  o.max_context = 96;
  o.max_batch_tokens = 96;
  o.page_size = 16;
  o.num_pages = 12;  // fewer than 3 × 6: pages come from a shared pool
  auto dec = cuda::CudaModelRunner::Create(*w, o);
  ASSERT_TRUE(dec.ok()) << dec.status();
  std::vector<int32_t> seq = Prompt(21, V, 5);
  {
    std::vector<int32_t> slots(seq.size(), 2), pos(seq.size());
    std::iota(pos.begin(), pos.end(), 0);
    const std::vector<int32_t> last = {static_cast<int32_t>(seq.size() - 1)};
    std::vector<float> logits(V);
    ASSERT_TRUE((*dec)->Forward({seq, slots, pos, last}, logits.data()).ok());
    seq.push_back(ArgMax(logits.data(), V));
  }
  std::vector<float> stepped;
  for (int step = 0; step < 12; ++step) {
    const std::vector<int32_t> tok = {seq.back()}, slot = {2},
                               p = {static_cast<int32_t>(seq.size() - 1)}, row = {0};
    std::vector<float> logits(V);
    const absl::Status s = (*dec)->Forward({tok, slot, p, row}, logits.data());
    ASSERT_TRUE(s.ok()) << s;
    stepped.insert(stepped.end(), logits.begin(), logits.end());
    seq.push_back(ArgMax(logits.data(), V));
  }
  o.use_cuda_graphs = false;
  auto fresh = cuda::CudaModelRunner::Create(*w, o);
  ASSERT_TRUE(fresh.ok());
  const int64_t n = static_cast<int64_t>(seq.size()) - 1;
  std::vector<int32_t> slots(n, 0), pos(n), rows;
  std::iota(pos.begin(), pos.end(), 0);
  for (int64_t r = n - 12; r < n; ++r) rows.push_back(static_cast<int32_t>(r));
  std::vector<float> recomputed(12 * V);
  ASSERT_TRUE(
      (*fresh)->Forward({std::span(seq).first(n), slots, pos, rows}, recomputed.data()).ok());
  const Agreement a = Compare(stepped, recomputed, V);
  std::printf("[kv-decode-vs-recompute] rel-L2 %.3g top-1 %.3f\n", a.rel_err, a.top1);
  EXPECT_LT(a.rel_err, 1e-2);
  EXPECT_EQ(a.top1, 1.0);
  // Releasing the slot returns its pages; the pool is then full again.
  (*dec)->ReleaseSlot(2);
  EXPECT_EQ((*dec)->kv_cache().num_free_pages(), 12);
}

TEST(CudaModelRunner, RefusesBadBatchesAndRunsOutOfPagesCleanly) {
  DSMOE_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto w = WriteAndLoad(dir, "tiny", DType::kBF16);
  cuda::CudaRunnerOptions o;
  o.num_slots = 2;
  o.max_context = 64;
  o.max_batch_tokens = 64;
  o.page_size = 16;
  o.num_pages = 2;
  auto r = cuda::CudaModelRunner::Create(*w, o);
  ASSERT_TRUE(r.ok());
  std::vector<float> logits(512);
  const std::vector<int32_t> zero = {0}, bad = {512};
  EXPECT_EQ((*r)->Forward({bad, zero, zero, zero}, logits.data()).code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<int32_t> skip = {40};
  EXPECT_EQ((*r)->Forward({zero, zero, skip, zero}, logits.data()).code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<int32_t> ids(33, 5), slots(33, 0), pos(33);
  std::iota(pos.begin(), pos.end(), 0);
  EXPECT_EQ((*r)->Forward({ids, slots, pos, {}}, logits.data()).code(),
            absl::StatusCode::kResourceExhausted);
}

// GPU attention with CPU routed experts (an expert server on CPU serving a GPU attention side)
// equals the all-GPU runner.
TEST(CudaModelRunner, ExternalCpuExpertsMatchGpuExperts) {
  DSMOE_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto w = WriteAndLoad(dir, "tiny", DType::kBF16);
  const int64_t V = w->config().vocab_size;
  ThreadPool pool(4);
  // Capacity in (token, expert) assignments: 24 prompt tokens × top-k.
  LocalExpertExecutor cpu_experts(*w, pool, 64 * w->config().num_experts_per_tok);
  cuda::CudaRunnerOptions o;
  o.max_context = 64;
  o.max_batch_tokens = 64;
  auto with_cpu = cuda::CudaModelRunner::Create(*w, o, &cpu_experts);
  auto all_gpu = cuda::CudaModelRunner::Create(*w, o);
  ASSERT_TRUE(with_cpu.ok() && all_gpu.ok());
  const std::vector<int32_t> ids = Prompt(24, V, 9);
  std::vector<int32_t> slots(24, 0), pos(24), rows(24);
  std::iota(pos.begin(), pos.end(), 0);
  std::iota(rows.begin(), rows.end(), 0);
  std::vector<float> a(24 * V), b(24 * V);
  ASSERT_TRUE((*with_cpu)->Forward({ids, slots, pos, rows}, a.data()).ok());
  ASSERT_TRUE((*all_gpu)->Forward({ids, slots, pos, rows}, b.data()).ok());
  const Agreement ag = Compare(a, b, V);
  std::printf("[gpu-attention+cpu-experts vs all-gpu] rel-L2 %.3g top-1 %.3f\n", ag.rel_err,
              ag.top1);
  EXPECT_LT(ag.rel_err, 0.05);
}

class CudaExpertExecutorTest : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaExpertExecutorTest, MatchesLocalExecutor) {
  DSMOE_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto w = WriteAndLoad(dir, GetParam(), DType::kBF16);
  const ModelConfig& c = w->config();
  const int64_t H = c.hidden_size, E = c.n_routed_experts, k = c.num_experts_per_tok;
  ThreadPool pool(4);
  for (int64_t T : {1, 7, 100}) {
    LocalExpertExecutor local(*w, pool, T * k);  // capacity in assignments
    auto gpu = cuda::CudaExpertExecutor::Create(*w, 0, T);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    // x through bf16, as the GPU sees it, so only accumulation and act rounding differ.
    std::vector<float> x = testing::RandomFloats(T * H, T + E);
    for (float& v : x) v = Bf16ToF32(F32ToBf16(v));
    auto [experts, weights] = testing::RandomRouting(T, E, k, static_cast<unsigned>(T), 0.05f);
    const int64_t layer = c.first_k_dense_replace;
    std::vector<float> want(T * H), got(T * H, NAN);
    ASSERT_TRUE(local.Run(layer, x.data(), T, experts.data(), weights.data(), k, want.data()).ok());
    const absl::Status s =
        (*gpu)->Run(layer, x.data(), T, experts.data(), weights.data(), k, got.data());
    ASSERT_TRUE(s.ok()) << s;
    const double err = RelErr(got, want);
    std::printf("[gpu-experts-vs-local] %s T=%ld rel-L2 %.3g\n", GetParam().c_str(),
                static_cast<long>(T), err);
    EXPECT_LT(err, 1e-2) << GetParam() << " T=" << T;
    // Bad input is refused, not computed.
    experts[0] = static_cast<int32_t>(E);
    EXPECT_EQ((*gpu)->Run(layer, x.data(), T, experts.data(), weights.data(), k, got.data()).code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// What a GPU expert server computes: explicit (token, expert) assignments, any number per token
// (none, one, several, out of order, an expert twice), against the CPU executor.
TEST_P(CudaExpertExecutorTest, RunAssignmentsMatchesLocalExecutor) {
  DSMOE_SKIP_WITHOUT_GPU();
  testing::TempDir dir;
  auto w = WriteAndLoad(dir, GetParam(), DType::kBF16);
  const ModelConfig& c = w->config();
  const int64_t H = c.hidden_size, E = c.n_routed_experts, k = c.num_experts_per_tok;
  const int64_t layer = c.first_k_dense_replace;
  ThreadPool pool(4);
  for (int64_t T : {1, 2, 9, 70}) {
    LocalExpertExecutor local(*w, pool, T * k);
    auto gpu = cuda::CudaExpertExecutor::Create(*w, 0, T);
    ASSERT_TRUE(gpu.ok()) << gpu.status();
    std::vector<float> x = testing::RandomFloats(T * H, 700 + T);
    for (float& v : x) v = Bf16ToF32(F32ToBf16(v));
    std::mt19937 rng(static_cast<unsigned>(T));
    std::vector<int32_t> tokens, experts;
    std::vector<float> weights;
    for (int64_t i = 0; i < T * k; ++i) {
      // Token 0 gets none when T > 1; the rest at random, so counts per token vary.
      tokens.push_back(static_cast<int32_t>(T > 1 ? 1 + rng() % (T - 1) : 0));
      experts.push_back(static_cast<int32_t>(rng() % E));
      weights.push_back(std::uniform_real_distribution<float>(0.05f, 1.0f)(rng));
    }
    const ExpertAssignments a{tokens.data(), experts.data(), weights.data(),
                              static_cast<int64_t>(tokens.size())};
    std::vector<float> want(T * H), got(T * H, NAN);
    ASSERT_TRUE(local.RunAssignments(layer, x.data(), T, a, want.data()).ok());
    const absl::Status s = (*gpu)->RunAssignments(layer, x.data(), T, a, got.data());
    ASSERT_TRUE(s.ok()) << s;
    const double err = RelErr(got, want);
    std::printf("[gpu-assignments-vs-local] %s T=%ld rel-L2 %.3g\n", GetParam().c_str(),
                static_cast<long>(T), err);
    EXPECT_LT(err, 1e-2) << GetParam() << " T=" << T;
    if (T > 1) {
      for (int64_t i = 0; i < H; ++i) ASSERT_EQ(got[i], 0.0f) << "token 0 has no assignment";
    }
    // Bad input is refused with the CPU executor's codes.
    tokens[0] = static_cast<int32_t>(T);
    EXPECT_EQ((*gpu)->RunAssignments(layer, x.data(), T, a, got.data()).code(),
              absl::StatusCode::kInvalidArgument);
    tokens[0] = 0;
    experts[0] = static_cast<int32_t>(E);
    EXPECT_EQ((*gpu)->RunAssignments(layer, x.data(), T, a, got.data()).code(),
              absl::StatusCode::kInvalidArgument);
    experts[0] = 0;
    EXPECT_EQ((*gpu)->RunAssignments(layer, x.data(), T + 1, a, got.data()).code(),
              absl::StatusCode::kResourceExhausted);
  }
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaExpertExecutorTest,
                         ::testing::Values("tiny", "gshard", "small"));

}  // namespace
}  // namespace dsmoe
