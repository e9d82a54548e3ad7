// Properties of the engine that the reference comparison does not cover: the KV cache gives
// the same tokens as recomputing from scratch, batching several sequences changes no one's
// logits, thread count changes nothing, and bad batches are refused.
#include "core/model/model_runner.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>

#include "core/model/generator.h"
#include "core/model/make_model.h"
#include "core/model/quantize.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using ::testing::HasSubstr;

class ModelRunnerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::WriteTinyModel(dir_.path(), DType::kBF16);
    weights_ = *ModelWeights::Load(dir_.path());
  }

  std::unique_ptr<ModelRunner> MakeRunner(ThreadPool& pool, int64_t slots = 1,
                                          int64_t max_batch = 64) {
    RunnerOptions o;
    o.num_slots = slots;
    o.max_context = 128;
    o.max_batch_tokens = max_batch;
    auto r = ModelRunner::Create(*weights_, pool, o);
    EXPECT_TRUE(r.ok()) << r.status();
    return std::move(*r);
  }

  // Logits of every position of `ids`, run from position 0 in `slot`.
  std::vector<float> AllLogits(ModelRunner& r, const std::vector<int32_t>& ids, int32_t slot = 0) {
    const int64_t T = static_cast<int64_t>(ids.size()), V = r.config().vocab_size;
    std::vector<int32_t> slots(T, slot), pos(T), rows(T);
    std::iota(pos.begin(), pos.end(), 0);
    std::iota(rows.begin(), rows.end(), 0);
    std::vector<float> logits(T * V);
    const absl::Status s = r.Forward({ids, slots, pos, rows}, logits.data());
    EXPECT_TRUE(s.ok()) << s;
    return logits;
  }

  testing::TempDir dir_;
  std::unique_ptr<ModelWeights> weights_;
};

double RelativeL2(const float* a, const float* b, int64_t n) {
  double num = 0, den = 0;
  for (int64_t i = 0; i < n; ++i) {
    num += (a[i] - b[i]) * double(a[i] - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / den);
}

TEST_F(ModelRunnerTest, KvCacheGenerationEqualsRecomputingFromScratch) {
  ThreadPool pool(2);
  auto runner = MakeRunner(pool);
  GenerateRequest req;
  req.prompt = {5, 17, 99, 260, 3};
  req.max_tokens = 20;
  req.ignore_eos = true;
  auto result = Generate(*runner, weights_->generation_config(), req);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->output_ids.size(), 20u);

  auto fresh = MakeRunner(pool);
  std::vector<int32_t> seq = req.prompt;
  const int64_t V = weights_->config().vocab_size;
  for (int32_t expected : result->output_ids) {
    const std::vector<float> logits = AllLogits(*fresh, seq);
    EXPECT_EQ(ArgMax(logits.data() + (seq.size() - 1) * V, V), expected)
        << "after " << seq.size() << " tokens";
    seq.push_back(expected);
  }
}

TEST_F(ModelRunnerTest, BatchingSequencesChangesNoOnesLogits) {
  ThreadPool pool(2);
  const std::vector<std::vector<int32_t>> prompts = {
      {1, 2, 3, 4, 5, 6, 7}, {300, 200}, {42, 43, 44, 45}};
  const int64_t V = weights_->config().vocab_size;
  // Alone: each prompt on its own runner.
  std::vector<std::vector<float>> alone;
  for (const auto& p : prompts) {
    auto r = MakeRunner(pool);
    alone.push_back(AllLogits(*r, p));
  }
  // Together: one Forward holding all three, interleaved, in three slots.
  auto r = MakeRunner(pool, 3);
  std::vector<int32_t> ids, slots, pos, rows;
  std::vector<std::pair<int, int>> origin;  // batch row → (prompt, position)
  for (size_t i = 0; i < 7; ++i) {
    for (int s = 0; s < 3; ++s) {
      if (i < prompts[s].size()) {
        rows.push_back(static_cast<int32_t>(ids.size()));
        ids.push_back(prompts[s][i]);
        slots.push_back(s);
        pos.push_back(static_cast<int32_t>(i));
        origin.emplace_back(s, static_cast<int>(i));
      }
    }
  }
  std::vector<float> together(ids.size() * V);
  ASSERT_TRUE(r->Forward({ids, slots, pos, rows}, together.data()).ok());
  for (size_t row = 0; row < ids.size(); ++row) {
    const auto [s, p] = origin[row];
    EXPECT_LT(RelativeL2(together.data() + row * V, alone[s].data() + p * V, V), 1e-6)
        << "prompt " << s << " position " << p;
  }
  // A decode step for all three at once equals each one's own next step.
  const std::vector<int32_t> next = {11, 12, 13};
  const std::vector<int32_t> step_slots = {0, 1, 2};
  const std::vector<int32_t> step_pos = {7, 2, 4};
  const std::vector<int32_t> step_rows = {0, 1, 2};
  std::vector<float> step(3 * V);
  ASSERT_TRUE(r->Forward({next, step_slots, step_pos, step_rows}, step.data()).ok());
  for (int s = 0; s < 3; ++s) {
    std::vector<int32_t> extended = prompts[s];
    extended.push_back(next[s]);
    auto solo = MakeRunner(pool);
    const std::vector<float> want = AllLogits(*solo, extended);
    EXPECT_LT(RelativeL2(step.data() + s * V, want.data() + prompts[s].size() * V, V), 1e-6)
        << "slot " << s;
  }
}

TEST_F(ModelRunnerTest, ThreadCountDoesNotChangeResults) {
  ThreadPool one(1), two(2);
  auto r1 = MakeRunner(one);
  auto r2 = MakeRunner(two);
  const std::vector<int32_t> ids = {9, 8, 7, 6, 5, 4, 3, 2, 1};
  const std::vector<float> a = AllLogits(*r1, ids), b = AllLogits(*r2, ids);
  EXPECT_LT(RelativeL2(a.data(), b.data(), static_cast<int64_t>(a.size())), 1e-6);
}

// A routed-expert executor with several lanes over local experts: Start records a lane's
// arguments, Finish computes them (as an expert server would, in between). It logs the order
// of the calls and fails a Start on a busy lane or a Finish on an idle one.
class LanedLocalExecutor final : public RoutedExpertExecutor {
 public:
  LanedLocalExecutor(const ModelWeights& w, ThreadPool& pool, int lanes)
      : local_(w, pool, 64 * w.config().num_experts_per_tok), pending_(lanes) {}
  absl::Status Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                   const float* weights, int64_t k, float* out) override {
    return local_.Run(layer, x, T, experts, weights, k, out);
  }
  int lanes() const override { return static_cast<int>(pending_.size()); }
  absl::Status Start(int lane, int64_t layer, const float* x, int64_t T, const int32_t* experts,
                     const float* weights, int64_t k) override {
    if (pending_[lane].has_value()) return absl::InternalError("Start on a busy lane");
    pending_[lane] = Args{layer, x, T, experts, weights, k};
    events.push_back(absl::StrCat("start ", lane, " layer ", layer, " tokens ", T));
    return absl::OkStatus();
  }
  absl::Status Finish(int lane, float* out) override {
    if (!pending_[lane].has_value()) return absl::InternalError("Finish on an idle lane");
    const Args a = *pending_[lane];
    pending_[lane].reset();
    events.push_back(absl::StrCat("finish ", lane, " layer ", a.layer));
    return local_.Run(a.layer, a.x, a.T, a.experts, a.weights, a.k, out);
  }
  std::vector<std::string> events;

 private:
  struct Args {
    int64_t layer;
    const float* x;
    int64_t T;
    const int32_t* experts;
    const float* weights;
    int64_t k;
  };
  LocalExpertExecutor local_;
  std::vector<std::optional<Args>> pending_;
};

// Micro-batches split a batch in contiguous parts that interleave layer by layer: a prompt
// chunk split between two micro-batches, mixed with other sequences' tokens, and decode steps
// after it give every row the logits of the whole batch — to rounding, as any change of batch
// composition does (a token's attention runs and GEMM tiles differ), with the same top token.
TEST_F(ModelRunnerTest, MicroBatchesChangeNoLogitBeyondRoundingAndOverlapTheRoutedExperts) {
  ThreadPool pool(2);
  const int64_t V = weights_->config().vocab_size;
  RunnerOptions o;
  o.num_slots = 3;
  o.max_context = 64;
  o.max_batch_tokens = 64;
  // Prompt chunks of three sequences (slot 0's split across micro-batches), then a decode step.
  const std::vector<int32_t> ids = {1, 2, 3, 4, 5, 6, 7, 300, 200, 42, 43, 44};
  const std::vector<int32_t> slots = {0, 0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2};
  const std::vector<int32_t> pos = {0, 1, 2, 3, 4, 5, 6, 0, 1, 0, 1, 2};
  std::vector<int32_t> rows(ids.size());
  std::iota(rows.begin(), rows.end(), 0);
  const std::vector<int32_t> step = {11, 12, 13}, step_slots = {0, 1, 2}, step_pos = {7, 2, 3},
                             step_rows = {0, 1, 2};
  auto run = [&](RoutedExpertExecutor* experts) {
    auto r = ModelRunner::Create(*weights_, pool, o, experts);
    EXPECT_TRUE(r.ok()) << r.status();
    std::vector<float> logits((ids.size() + step.size()) * V);
    EXPECT_TRUE((*r)->Forward({ids, slots, pos, rows}, logits.data()).ok());
    EXPECT_TRUE(
        (*r)->Forward({step, step_slots, step_pos, step_rows}, logits.data() + ids.size() * V)
            .ok());
    return logits;
  };
  const std::vector<float> whole = run(nullptr);  // local experts: one batch
  for (int lanes : {1, 2, 3, 5}) {
    LanedLocalExecutor experts(*weights_, pool, lanes);
    const std::vector<float> split = run(&experts);
    ASSERT_EQ(split.size(), whole.size());
    for (size_t row = 0; row < whole.size() / V; ++row) {
      const float* a = split.data() + row * V;
      const float* b = whole.data() + row * V;
      EXPECT_LT(RelativeL2(a, b, V), 1e-6) << lanes << " micro-batches, row " << row;
      EXPECT_EQ(std::max_element(a, a + V) - a, std::max_element(b, b + V) - b)
          << lanes << " micro-batches, row " << row;
    }
    if (lanes == 1) {  // one lane: the same computation as local experts, to the bit
      EXPECT_EQ(std::memcmp(split.data(), whole.data(), whole.size() * sizeof(float)), 0);
    }
    if (lanes == 2) {
      // Layer 1 is the first MoE layer: micro-batch 1 starts its routed experts before
      // micro-batch 0's are collected, and 0 goes on to layer 2 before 1's are collected.
      const std::vector<std::string> want = {"start 0 layer 1 tokens 6", "start 1 layer 1 tokens 6",
                                             "finish 0 layer 1", "start 0 layer 2 tokens 6",
                                             "finish 1 layer 1"};
      ASSERT_GE(experts.events.size(), want.size());
      EXPECT_EQ(std::vector<std::string>(experts.events.begin(), experts.events.begin() + 5), want);
    }
  }
}

// The profile charges every part of a forward pass to a phase: each phase the tiny model has
// (a dense layer, MoE layers with shared experts) gains time, and together they account for
// the call's wall time.
TEST_F(ModelRunnerTest, ProfileChargesTheWholeForwardToItsPhases) {
  ThreadPool pool(1);
  auto r = MakeRunner(pool);
  const std::vector<int32_t> ids = {9, 8, 7, 6, 5, 4, 3, 2, 1};
  const auto start = std::chrono::steady_clock::now();
  AllLogits(*r, ids);
  const double wall =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  const ForwardProfile& p = *r->profile();
  double sum = 0;
  for (size_t i = 0; i < p.seconds.size(); ++i) {
    EXPECT_GT(p.seconds[i], 0) << ForwardPhaseName(static_cast<ForwardPhase>(i));
    sum += p.seconds[i];
  }
  EXPECT_LE(sum, wall);
  EXPECT_GE(sum, 0.5 * wall);
}

TEST_F(ModelRunnerTest, RefusesBadBatches) {
  ThreadPool pool(1);
  auto r = MakeRunner(pool);
  std::vector<float> logits(512);
  const std::vector<int32_t> zero = {0}, row = {0};
  const std::vector<int32_t> bad_token = {512};
  absl::Status s = r->Forward({bad_token, zero, zero, row}, logits.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("token id 512 is outside the vocabulary [0, 512)"));
  const std::vector<int32_t> far = {128};
  s = r->Forward({zero, zero, far, row}, logits.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kOutOfRange);
  const std::vector<int32_t> slot1 = {1};
  s = r->Forward({zero, slot1, zero, row}, logits.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(r->Forward({{}, {}, {}, {}}, logits.data()).code(), absl::StatusCode::kInvalidArgument);
}

TEST(BatchLimits, ResolveFillsTheModelContextAndRefusesWhatCannotBeSized) {
  ModelConfig c = *PresetConfig("tiny");  // max_position_embeddings 4096
  auto r = BatchLimits({8, 2, 0}).Resolve(c);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->max_context, 4096);
  EXPECT_EQ(r->num_slots, 2);
  c.rope_scaling = {RopeScaling::Type::kLinear, 2.0};  // linear scaling stretches the context
  EXPECT_EQ(BatchLimits({8, 2, 0}).Resolve(c)->max_context, 8192);
  absl::StatusOr<BatchLimits> bad = BatchLimits({8, 2, 8193}).Resolve(c);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(bad.status().message()),
              HasSubstr("max context 8193 exceeds the model's maximum of 8192"));
  EXPECT_EQ(BatchLimits({0, 2, 16}).Resolve(c).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(BatchLimits({8, 0, 16}).Resolve(c).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(BatchLimits, CheckBatchRefusesBeyondEachLimit) {
  const BatchLimits limits{2, 3, 10};
  const std::vector<int32_t> ids = {1, 2}, slots = {0, 2}, pos = {0, 9}, rows = {0, 1};
  EXPECT_TRUE(CheckBatch({ids, slots, pos, rows}, limits, 16).ok());
  const std::vector<int32_t> three = {1, 2, 3};
  EXPECT_THAT(std::string(CheckBatch({three, three, three, {}}, limits, 16).message()),
              HasSubstr("batch of 3 tokens exceeds max_batch_tokens 2"));
  const std::vector<int32_t> slot3 = {0, 3};
  EXPECT_THAT(std::string(CheckBatch({ids, slot3, pos, rows}, limits, 16).message()),
              HasSubstr("slot 3 outside [0, 3)"));
  const std::vector<int32_t> pos10 = {0, 10};
  EXPECT_EQ(CheckBatch({ids, slots, pos10, rows}, limits, 16).code(),
            absl::StatusCode::kOutOfRange);
  const std::vector<int32_t> descending = {1, 0};
  EXPECT_EQ(CheckBatch({ids, slots, pos, descending}, limits, 16).code(),
            absl::StatusCode::kInvalidArgument);
}

// RoPE against the closed form (HF: angle = position / factor · θ^(−2i / head_dim)).
TEST(RopeTable, MatchesTheClosedFormWithLinearScaling) {
  ModelConfig c = *PresetConfig("tiny");  // head_dim 16
  c.rope_theta = 500.0;
  c.rope_scaling = {RopeScaling::Type::kLinear, 4.0};
  const RopeTable rope(c, 64);
  const int64_t half = 8;
  ASSERT_EQ(rope.cos().size(), static_cast<size_t>(64 * half));
  for (int64_t p : {0, 1, 5, 63}) {
    for (int64_t i : {0, 3, 7}) {
      const double angle = p / 4.0 * std::pow(500.0, -2.0 * i / 16.0);
      EXPECT_NEAR(rope.cos()[p * half + i], std::cos(angle), 1e-7) << p << " " << i;
      EXPECT_NEAR(rope.sin()[p * half + i], std::sin(angle), 1e-7) << p << " " << i;
    }
  }
  // Apply rotates each (first half, second half) pair of a head by the angle.
  std::vector<float> x(16, 0.0f);
  x[3] = 1.0f;  // pair (3, 11)
  const std::vector<int32_t> position = {5};
  rope.Apply(x.data(), 1, 1, position);
  const double angle = 5 / 4.0 * std::pow(500.0, -6.0 / 16.0);
  EXPECT_NEAR(x[3], std::cos(angle), 1e-6);
  EXPECT_NEAR(x[11], std::sin(angle), 1e-6);
}

TEST_F(ModelRunnerTest, MissingRoutedExpertFailsThePreconditionNamingIt) {
  WeightSelection no_experts;
  no_experts.all_routed_experts = false;
  auto w = ModelWeights::Load(dir_.path(), no_experts);
  ASSERT_TRUE(w.ok());
  ThreadPool pool(1);
  auto r = ModelRunner::Create(**w, pool, RunnerOptions{8, 1, 16});
  ASSERT_TRUE(r.ok());
  const std::vector<int32_t> tok = {5}, zero = {0};
  std::vector<float> logits(512);
  const absl::Status s = (*r)->Forward({tok, zero, zero, zero}, logits.data());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(s.message()), HasSubstr("routed expert (layer 1, expert"));
}

TEST_F(ModelRunnerTest, GenerationStopsAtEosAndAtTheContextEnd) {
  ThreadPool pool(1);
  auto r = MakeRunner(pool);
  GenerateRequest req;
  req.prompt = {5, 6, 7};
  req.max_tokens = 1000;
  req.ignore_eos = true;
  auto result = Generate(*r, weights_->generation_config(), req);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->finish_reason, FinishReason::kLength);
  EXPECT_EQ(result->output_ids.size(), 128u - 3u);  // prompt + output fill the context
  // Stop on the first token it would produce.
  req.max_tokens = 5;
  auto first = Generate(*r, weights_->generation_config(), req);
  req.stop_token_ids = {first->output_ids[0]};
  auto stopped = Generate(*r, weights_->generation_config(), req);
  ASSERT_TRUE(stopped.ok());
  EXPECT_EQ(stopped->output_ids.size(), 1u);
  EXPECT_EQ(stopped->finish_reason, FinishReason::kStop);
  req.prompt.clear();
  EXPECT_EQ(Generate(*r, weights_->generation_config(), req).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace dsmoe

namespace dsmoe {
namespace {

// Q8_0 against the BF16 model it was made from: what a user trading accuracy for bytes gets.
TEST(Quantized, LogitsStayCloseToBf16AndTop1MostlyAgrees) {
  testing::TempDir dir;
  const std::string bf16 = dir.File("bf16"), q8 = dir.File("q8");
  ModelConfig c = *PresetConfig("tiny");
  ASSERT_TRUE(WriteRandomCheckpoint(c, {DType::kBF16, 21, 1}, bf16).ok());
  auto report = QuantizeCheckpoint(bf16, q8);
  ASSERT_TRUE(report.ok()) << report.status();
  EXPECT_GT(report->quantized_tensors, 0);
  EXPECT_LT(report->bytes_out,
            report->bytes_in * 0.6);  // linear weights at ~1.06 bytes instead of 2
  auto wa = ModelWeights::Load(bf16);
  auto wb = ModelWeights::Load(q8);
  ASSERT_TRUE(wa.ok() && wb.ok()) << wb.status();
  EXPECT_EQ((*wb)->layers[1].routed[0].gate.dtype, DType::kQ8_0);
  EXPECT_EQ((*wb)->layers[1].router.dtype,
            DType::kBF16);  // routing decisions stay in the source dtype
  ThreadPool pool(2);
  RunnerOptions o;
  o.max_context = 128;
  o.max_batch_tokens = 128;
  auto ra = ModelRunner::Create(**wa, pool, o);
  auto rb = ModelRunner::Create(**wb, pool, o);
  const int64_t T = 96, V = c.vocab_size;
  std::vector<int32_t> ids(T), slots(T, 0), pos(T), rows(T);
  for (int64_t t = 0; t < T; ++t) {
    ids[t] = static_cast<int32_t>(2 + (t * 37) % 500);
    pos[t] = rows[t] = static_cast<int32_t>(t);
  }
  std::vector<float> la(T * V), lb(T * V);
  ASSERT_TRUE((*ra)->Forward({ids, slots, pos, rows}, la.data()).ok());
  ASSERT_TRUE((*rb)->Forward({ids, slots, pos, rows}, lb.data()).ok());
  double worst = 0, mean = 0;
  int agree = 0;
  for (int64_t t = 0; t < T; ++t) {
    const double e = RelativeL2(lb.data() + t * V, la.data() + t * V, V);
    worst = std::max(worst, e);
    mean += e / T;
    agree += ArgMax(la.data() + t * V, V) == ArgMax(lb.data() + t * V, V);
  }
  std::printf(
      "Q8_0 vs BF16 (tiny, %lld positions): logit relative L2 mean %.4f max %.4f, top-1 agreement "
      "%d/%lld\n",
      static_cast<long long>(T), mean, worst, agree, static_cast<long long>(T));
  EXPECT_LT(mean, 0.03);
  EXPECT_LT(worst, 0.1);
  EXPECT_GE(agree, T * 9 / 10);
}

}  // namespace
}  // namespace dsmoe
