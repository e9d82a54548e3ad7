// The scheduler under a KV-cache budget far below num_slots × max_context: requests are admitted
// as pages allow, running sequences are preempted (and recomputed) when the pages run out, and
// nothing is lost or changed: every greedy output equals its solo run on a plain runner
// (core/model/generator.h, no scheduler, no preemption, a cache for the whole context).
#include "attention-server/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <numeric>

#include "core/model/kv_cache.h"
#include "core/rpc/metrics.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

class Collector final : public SequenceSink {
 public:
  void OnToken(int32_t id) override {
    std::lock_guard<std::mutex> lock(mu_);
    tokens_.push_back(id);
    cv_.notify_all();
  }
  void OnLogprobs(const TokenLogprobs& logprobs) override {
    std::lock_guard<std::mutex> lock(mu_);
    logprobs_.push_back(logprobs);
  }
  void OnPromptLogprobs(std::span<const TokenLogprobs> logprobs) override {
    std::lock_guard<std::mutex> lock(mu_);
    prompt_logprobs_.assign(logprobs.begin(), logprobs.end());
    ++prompt_logprob_calls_;
    prompt_logprobs_before_tokens_ = tokens_.empty();
  }
  void OnFinish(FinishReason reason, const absl::Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    reason_ = reason;
    status_ = status;
    ++finishes_;
    cv_.notify_all();
  }
  bool Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(120), [&] { return finishes_ > 0; });
  }
  // Waits until at least `n` tokens arrived (or the sequence finished).
  void WaitTokens(size_t n) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, std::chrono::seconds(120),
                 [&] { return tokens_.size() >= n || finishes_ > 0; });
  }
  std::vector<int32_t> tokens() {
    std::lock_guard<std::mutex> lock(mu_);
    return tokens_;
  }
  absl::Status status() {
    std::lock_guard<std::mutex> lock(mu_);
    return status_;
  }
  std::vector<TokenLogprobs> logprobs() {
    std::lock_guard<std::mutex> lock(mu_);
    return logprobs_;
  }
  int finishes() {
    std::lock_guard<std::mutex> lock(mu_);
    return finishes_;
  }
  FinishReason reason() {
    std::lock_guard<std::mutex> lock(mu_);
    return reason_;
  }
  std::vector<TokenLogprobs> prompt_logprobs() {
    std::lock_guard<std::mutex> lock(mu_);
    return prompt_logprobs_;
  }
  int prompt_logprob_calls() {
    std::lock_guard<std::mutex> lock(mu_);
    return prompt_logprob_calls_;
  }
  bool prompt_logprobs_before_tokens() {
    std::lock_guard<std::mutex> lock(mu_);
    return prompt_logprobs_before_tokens_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<int32_t> tokens_;
  std::vector<TokenLogprobs> logprobs_;
  std::vector<TokenLogprobs> prompt_logprobs_;
  int prompt_logprob_calls_ = 0;
  bool prompt_logprobs_before_tokens_ = false;
  FinishReason reason_ = FinishReason::kStop;
  absl::Status status_;
  int finishes_ = 0;
};

class SchedulerKvTest : public ::testing::Test {
 protected:
  void SetUp() override {
    testing::WriteTinyModel(dir_.path(), DType::kF32);
    weights_ = *ModelWeights::Load(dir_.path());
  }
  // Options with `pages` pages of 4 positions.
  SchedulerOptions Options(int64_t pages) const {
    SchedulerOptions o;
    o.num_slots = 8;
    o.max_context = 64;
    o.max_batch_tokens = 32;
    o.kv_page_tokens = 4;
    o.kv_cache_bytes = KvBytesPerToken(weights_->config(), sizeof(float)) * 4 * pages;
    return o;
  }
  std::vector<int32_t> Prompt(int i) const {
    std::vector<int32_t> p(3 + i % 8);
    for (size_t j = 0; j < p.size(); ++j)
      p[j] = static_cast<int32_t>((i * 37 + j * 11 + 1) % weights_->config().vocab_size);
    return p;
  }
  // The solo run: a plain runner (every slot reaches max_context), one sequence, no scheduler.
  std::vector<int32_t> Solo(const std::vector<int32_t>& prompt, int64_t max_tokens,
                            int64_t max_context = 64, KvDType kv_dtype = KvDType::kAuto) {
    RunnerOptions o;
    o.num_slots = 1;
    o.max_context = max_context;
    o.kv_dtype = kv_dtype;
    o.max_batch_tokens = 32;
    auto runner = ModelRunner::Create(*weights_, solo_pool_, o);
    EXPECT_TRUE(runner.ok());
    GenerateRequest req;
    req.prompt = prompt;
    req.max_tokens = max_tokens;
    req.ignore_eos = true;
    auto r = Generate(**runner, weights_->generation_config(), req);
    EXPECT_TRUE(r.ok()) << r.status();
    return r->output_ids;
  }

  testing::TempDir dir_;
  std::unique_ptr<ModelWeights> weights_;
  ThreadPool pool_{2};       // the scheduler's
  ThreadPool solo_pool_{1};  // the test thread's runners (a pool serves one thread at a time)
};

// Logprobs of sequences decoded together (greedy and sampled, some without logprobs) equal
// log_softmax, computed here in long double, of the logits ComputeLogits gives for the whole
// sequence in one prefill: another path through the runner (one pass over every position).
TEST_F(SchedulerKvTest, LogprobsAreTheLogSoftmaxOfTheRawLogits) {
  auto scheduler = Scheduler::Create(*weights_, pool_, Options(64));
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  constexpr int kRequests = 6;
  std::vector<std::shared_ptr<Collector>> sinks;
  std::vector<SequenceParams> params;
  for (int i = 0; i < kRequests; ++i) {
    SequenceParams p;
    p.prompt = Prompt(i);
    p.max_tokens = 8;
    // Sampled ones at a high temperature with top-k: the logprobs are before both.
    if (i % 2 == 1) p.sampling = {1.7, 3, 1.0, static_cast<uint64_t>(i)};
    p.logprobs = i != 4;
    p.top_logprobs = i == 0 ? 0 : i == 1 ? kMaxTopLogprobs : 4;
    params.push_back(p);
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE((*scheduler)->Submit(std::move(p), sinks.back()).ok());
  }
  const int64_t V = weights_->config().vocab_size;
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(sinks[i]->Wait());
    const std::vector<int32_t> out = sinks[i]->tokens();
    const std::vector<TokenLogprobs> lps = sinks[i]->logprobs();
    if (!params[i].logprobs) {
      EXPECT_TRUE(lps.empty());
      continue;
    }
    ASSERT_EQ(lps.size(), out.size());
    std::vector<int32_t> seq = params[i].prompt;
    seq.insert(seq.end(), out.begin(), out.end() - 1);
    auto logits = (*scheduler)->ComputeLogits(seq);
    ASSERT_TRUE(logits.ok()) << logits.status();
    const int64_t P = static_cast<int64_t>(params[i].prompt.size());
    for (size_t t = 0; t < out.size(); ++t) {
      const float* row = logits->data() + (P - 1 + static_cast<int64_t>(t)) * V;
      long double sum = 0;
      for (int64_t v = 0; v < V; ++v) sum += std::exp(static_cast<long double>(row[v]));
      auto ref = [&](int32_t id) { return static_cast<double>(row[id] - std::log(sum)); };
      EXPECT_EQ(lps[t].token_id, out[t]);
      EXPECT_NEAR(lps[t].logprob, ref(out[t]), 1e-4) << "request " << i << " token " << t;
      std::vector<int32_t> order(V);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return row[a] > row[b]; });
      ASSERT_EQ(lps[t].top.size(), static_cast<size_t>(params[i].top_logprobs));
      for (size_t k = 0; k < lps[t].top.size(); ++k) {
        // The k-th most likely value; the id too unless it ties with a neighbour.
        EXPECT_NEAR(lps[t].top[k].logprob, ref(order[k]), 1e-4);
        EXPECT_NEAR(lps[t].top[k].logprob, ref(lps[t].top[k].token_id), 1e-4);
      }
    }
  }
  SequenceParams bad;
  bad.prompt = Prompt(0);
  bad.logprobs = true;
  bad.top_logprobs = kMaxTopLogprobs + 1;
  EXPECT_EQ((*scheduler)->Submit(bad, std::make_shared<Collector>()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(SchedulerKvTest, PreemptedGreedySequencesEqualTheirSoloRuns) {
  rpc::MetricsRegistry registry("tiny");
  AttentionMetrics metrics(registry, weights_->config());
  // 24 pages of 4 positions: about three sequences at their full length of up to 34 positions,
  // for 8 slots and 16 requests.
  auto scheduler = Scheduler::Create(*weights_, pool_, Options(24), nullptr, &metrics);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  constexpr int kRequests = 16;
  constexpr int64_t kMaxTokens = 24;
  std::vector<std::shared_ptr<Collector>> sinks;
  for (int i = 0; i < kRequests; ++i) {
    SequenceParams p;
    p.prompt = Prompt(i);
    p.max_tokens = kMaxTokens;
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE((*scheduler)->Submit(std::move(p), sinks.back()).ok());
  }
  for (int i = 0; i < kRequests; ++i) {
    ASSERT_TRUE(sinks[i]->Wait()) << "request " << i << " never finished";
    EXPECT_TRUE(sinks[i]->status().ok()) << sinks[i]->status();
    EXPECT_EQ(sinks[i]->finishes(), 1);
    EXPECT_EQ(sinks[i]->tokens(), Solo(Prompt(i), kMaxTokens)) << "request " << i;
  }
  EXPECT_GT(metrics.scheduler().preemptions->Value(), 0) << "the budget never ran out";
  // Everything finished: every page is back.
  const absl::Status between = (*scheduler)->RunBetweenSteps([] {});
  ASSERT_TRUE(between.ok());
  EXPECT_EQ(metrics.scheduler().kv_pages_used->Value(), 0);
  EXPECT_EQ(metrics.scheduler().kv_pages_free->Value(), 24);
}

TEST_F(SchedulerKvTest, ComputeLogitsFindsPagesAmongRunningSequences) {
  auto scheduler = Scheduler::Create(*weights_, pool_, Options(12));
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  std::vector<std::shared_ptr<Collector>> sinks;
  for (int i = 0; i < 4; ++i) {
    SequenceParams p;
    p.prompt = Prompt(i + 3);
    p.max_tokens = 20;
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE((*scheduler)->Submit(std::move(p), sinks.back()).ok());
  }
  // 40 positions: 10 of the 12 pages, whatever the sequences hold meanwhile.
  std::vector<int32_t> ids(40);
  for (int i = 0; i < 40; ++i) ids[i] = (i * 7 + 2) % weights_->config().vocab_size;
  auto logits = (*scheduler)->ComputeLogits(ids);
  ASSERT_TRUE(logits.ok()) << logits.status();
  RunnerOptions o;
  o.max_context = 64;
  o.max_batch_tokens = 64;
  auto plain = ModelRunner::Create(*weights_, solo_pool_, o);
  ASSERT_TRUE(plain.ok());
  const int64_t V = weights_->config().vocab_size;
  std::vector<int32_t> slots(40, 0), pos(40), rows(40);
  std::iota(pos.begin(), pos.end(), 0);
  std::iota(rows.begin(), rows.end(), 0);
  std::vector<float> want(40 * V);
  ASSERT_TRUE((*plain)->Forward({ids, slots, pos, rows}, want.data()).ok());
  for (int64_t i = 0; i < 40 * V; ++i) ASSERT_NEAR((*logits)[i], want[i], 1e-4) << i;
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(sinks[i]->Wait());
    EXPECT_EQ(sinks[i]->tokens(), Solo(Prompt(i + 3), 20)) << "request " << i;
  }
}

TEST_F(SchedulerKvTest, ContextIsWhatThePagesHold) {
  auto scheduler = Scheduler::Create(*weights_, pool_, Options(8));  // 32 positions < 64
  ASSERT_TRUE(scheduler.ok());
  EXPECT_EQ((*scheduler)->max_context(), 32);
  SequenceParams p;
  p.prompt.assign(40, 5);
  auto refused = (*scheduler)->Submit(std::move(p), std::make_shared<Collector>());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument) << refused.status();
  // A sequence alone up to the end of those pages finishes by length, not by failure.
  SequenceParams q;
  q.prompt = Prompt(1);
  q.max_tokens = 100;
  auto sink = std::make_shared<Collector>();
  ASSERT_TRUE((*scheduler)->Submit(std::move(q), sink).ok());
  ASSERT_TRUE(sink->Wait());
  EXPECT_TRUE(sink->status().ok()) << sink->status();
  EXPECT_EQ(static_cast<int64_t>(Prompt(1).size() + sink->tokens().size()), 32);
}

// Prefix caching: many requests sharing a long "system prompt" (and some a chat history
// after it) run interleaved under a budget that forces preemption. Each greedy output must
// equal the same workload with caching off and the request's solo run (F32 KV: a cached page
// holds what recomputing it would write).
class PrefixCacheTest : public SchedulerKvTest {
 protected:
  static constexpr int64_t kContext = 128;
  SchedulerOptions CachingOptions(int64_t pages, bool caching) const {
    SchedulerOptions o = Options(pages);
    o.kv_dtype = kv_dtype_;
    o.kv_cache_bytes = KvBytesPerToken(weights_->config(),
                                       KvElementBytes(ResolveKvDType(kv_dtype_, DType::kF32))) *
                       4 * pages;
    o.max_context = kContext;
    o.max_batch_tokens = 24;  // long prompts are prefilled in chunks
    o.enable_prefix_caching = caching;
    return o;
  }
  // A 40-token system prompt (10 whole pages of 4), then for some a 10-token history shared
  // by a third of the requests, then a tail of its own. Request 0 is the system prompt alone
  // (its last token lies in a full, cached page: it must be computed anyway), request 1 a
  // prefix of request 2's prompt.
  std::vector<int32_t> SharedPrompt(int i) const {
    const int32_t V = static_cast<int32_t>(weights_->config().vocab_size);
    std::vector<int32_t> p;
    for (int j = 0; j < 40; ++j) p.push_back((j * 13 + 5) % V);
    if (i == 0) return p;
    if (i % 3 != 0) {
      for (int j = 0; j < 10; ++j) p.push_back((j * 7 + 100 * (i % 3)) % V);
    }
    if (i == 1) return p;
    for (int j = 0; j < 1 + i % 6; ++j) p.push_back((i * 31 + j * 17 + 3) % V);
    return p;
  }
  struct Run {
    std::vector<std::vector<int32_t>> outputs;
    double preemptions = 0, queried = 0, hits = 0, prompt_tokens = 0;
  };
  // Request 0 alone first (its pages are then cached), then the rest at once.
  Run RunAll(int num_requests, int64_t max_tokens, int64_t pages, bool caching) {
    rpc::MetricsRegistry registry("tiny");
    AttentionMetrics metrics(registry, weights_->config());
    auto scheduler =
        Scheduler::Create(*weights_, pool_, CachingOptions(pages, caching), nullptr, &metrics);
    EXPECT_TRUE(scheduler.ok()) << scheduler.status();
    std::vector<std::shared_ptr<Collector>> sinks;
    for (int i = 0; i < num_requests; ++i) {
      SequenceParams p;
      p.prompt = SharedPrompt(i);
      p.max_tokens = max_tokens;
      sinks.push_back(std::make_shared<Collector>());
      EXPECT_TRUE((*scheduler)->Submit(std::move(p), sinks.back()).ok());
      if (i == 0) sinks[0]->WaitTokens(2);
    }
    Run run;
    for (int i = 0; i < num_requests; ++i) {
      EXPECT_TRUE(sinks[i]->Wait()) << "request " << i << " never finished";
      EXPECT_TRUE(sinks[i]->status().ok()) << sinks[i]->status();
      run.outputs.push_back(sinks[i]->tokens());
    }
    EXPECT_TRUE((*scheduler)->RunBetweenSteps([] {}).ok());
    const SchedulerMetrics& m = metrics.scheduler();
    // Every page is back: none held, cached ones count as free.
    EXPECT_EQ(m.kv_pages_used->Value(), 0);
    EXPECT_EQ(m.kv_pages_free->Value(), static_cast<double>(pages));
    if (caching) {
      EXPECT_GT(m.prefix_cache_pages->Value(), 0);
    } else {
      EXPECT_EQ(m.prefix_cache_pages->Value(), 0);
    }
    run.preemptions = m.preemptions->Value();
    run.queried = m.prefix_cache_queries->Value();
    run.hits = m.prefix_cache_hits->Value();
    run.prompt_tokens = m.prompt_tokens->Value();
    return run;
  }

  // Request i's prompt, outputs with and without the cache, and its solo run agree.
  void ExpectSameOutputs();
  KvDType kv_dtype_ = KvDType::kF32;
};

TEST_F(PrefixCacheTest, GreedyOutputIsTheSameWithAndWithoutTheCacheUnderPreemption) {
  ExpectSameOutputs();
}

// BF16 pages: a cached page holds the same rounded values a recomputation would write.
TEST_F(PrefixCacheTest, GreedyOutputIsTheSameWithAndWithoutTheCacheWithBf16Pages) {
  kv_dtype_ = KvDType::kBF16;
  ExpectSameOutputs();
}

void PrefixCacheTest::ExpectSameOutputs() {
  constexpr int kRequests = 18;
  constexpr int64_t kMaxTokens = 12;
  // 36 pages of 4: the shared 10 pages plus about two sequences' own, for 8 slots.
  const Run cached = RunAll(kRequests, kMaxTokens, 36, /*caching=*/true);
  const Run plain = RunAll(kRequests, kMaxTokens, 36, /*caching=*/false);
  for (int i = 0; i < kRequests; ++i) {
    SCOPED_TRACE(::testing::Message() << "request " << i);
    EXPECT_EQ(static_cast<int64_t>(cached.outputs[i].size()), kMaxTokens);
    EXPECT_EQ(cached.outputs[i], plain.outputs[i]);
    EXPECT_EQ(cached.outputs[i], Solo(SharedPrompt(i), kMaxTokens, kContext, kv_dtype_));
  }
  // Sharing lets more sequences in than pages allow them to finish: some are preempted (and
  // find their own pages again when readmitted). Without the cache admission lets in fewer.
  EXPECT_GT(cached.preemptions, 0) << "the budget never ran out";
  // Requests after the first find the system prompt's 10 pages (unless evicted meanwhile:
  // at least half of them do).
  EXPECT_GE(cached.hits, 40.0 * (kRequests - 1) / 2);
  EXPECT_LE(cached.hits, cached.queried);
  EXPECT_EQ(plain.queried, 0);
  // What was found was not prefilled again.
  EXPECT_LE(cached.prompt_tokens, plain.prompt_tokens - 40.0 * (kRequests - 1) / 2);
}

TEST_F(PrefixCacheTest, CancelledSequencesGiveBackSharedPages) {
  rpc::MetricsRegistry registry("tiny");
  AttentionMetrics metrics(registry, weights_->config());
  auto scheduler = Scheduler::Create(*weights_, pool_, CachingOptions(64, true), nullptr, &metrics);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  std::vector<std::shared_ptr<Collector>> sinks;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 6; ++i) {
    SequenceParams p;
    p.prompt = SharedPrompt(i);
    p.max_tokens = 1000;  // runs until cancelled (or the context ends)
    sinks.push_back(std::make_shared<Collector>());
    auto id = (*scheduler)->Submit(std::move(p), sinks.back());
    ASSERT_TRUE(id.ok());
    ids.push_back(*id);
    if (i == 0) sinks[0]->WaitTokens(2);
  }
  for (auto& sink : sinks) sink->WaitTokens(3);
  for (uint64_t id : ids) (*scheduler)->Cancel(id);
  for (auto& sink : sinks) {
    ASSERT_TRUE(sink->Wait());
    EXPECT_EQ(sink->finishes(), 1);
  }
  ASSERT_TRUE((*scheduler)->RunBetweenSteps([] {}).ok());
  EXPECT_EQ(metrics.scheduler().kv_pages_used->Value(), 0);
  EXPECT_EQ(metrics.scheduler().kv_pages_free->Value(), 64);
  EXPECT_GT(metrics.scheduler().prefix_cache_hits->Value(), 0);
}

// Prompt logprobs: for every prompt token from the 2nd on, log_softmax of the logits at the
// position before it, evaluated at it. The reference is computed here: a plain ModelRunner's
// logits for the whole prompt in one pass (no scheduler, no chunks, no cache), and a naive
// double-precision log-softmax over the vocabulary.
class PromptLogprobsTest : public SchedulerKvTest {
 protected:
  static constexpr int64_t kChunk = 8;   // max_batch_tokens: longer prompts come in chunks
  static constexpr int64_t kRowCap = 5;  // prompt-logprob rows per step, all sequences together
  SchedulerOptions PromptOptions(int64_t pages) const {
    SchedulerOptions o = Options(pages);
    o.max_batch_tokens = kChunk;
    o.max_prompt_logprob_rows = kRowCap;
    o.enable_prefix_caching = true;
    return o;
  }
  // Prompts of 1 (no logprob at all), 2, 5, 9, 13 and 30 tokens.
  std::vector<int32_t> LongPrompt(int i) const {
    static constexpr int kLengths[] = {1, 2, 5, 9, 13, 30};
    std::vector<int32_t> p(kLengths[i % 6]);
    for (size_t j = 0; j < p.size(); ++j)
      p[j] = static_cast<int32_t>((i * 53 + j * 29 + 7) % weights_->config().vocab_size);
    return p;
  }
  // Reference log-probabilities of `prompt`: row p is log_softmax of the logits at position p
  // (which predict token p + 1).
  std::vector<std::vector<double>> Reference(const std::vector<int32_t>& prompt) {
    auto rows = testing::WholeSequenceLogSoftmax(*weights_, solo_pool_, prompt);
    EXPECT_TRUE(rows.ok()) << rows.status();
    return rows.ok() ? *std::move(rows) : std::vector<std::vector<double>>();
  }
  void ExpectMatchesReference(const std::vector<int32_t>& prompt,
                              const std::vector<TokenLogprobs>& got, int num_top) {
    const auto ref = Reference(prompt);
    const int64_t V = weights_->config().vocab_size;
    ASSERT_EQ(got.size(), prompt.size() - 1);
    for (size_t p = 0; p < got.size(); ++p) {
      SCOPED_TRACE(::testing::Message() << "prompt token " << p + 1);
      EXPECT_EQ(got[p].token_id, prompt[p + 1]);
      EXPECT_NEAR(got[p].logprob, ref[p][prompt[p + 1]], 1e-5);
      std::vector<int32_t> order(V);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return ref[p][a] > ref[p][b]; });
      ASSERT_EQ(got[p].top.size(), static_cast<size_t>(num_top));
      for (size_t k = 0; k < got[p].top.size(); ++k) {
        EXPECT_NEAR(got[p].top[k].logprob, ref[p][order[k]], 1e-5) << "alternative " << k;
        EXPECT_NEAR(got[p].top[k].logprob, ref[p][got[p].top[k].token_id], 1e-5);
      }
    }
  }
};

// Several prompts at once, one longer than a chunk and several together beyond the per-step
// row cap, under a page budget that preempts some: each sink hears its prompt's logprobs once,
// before its first token, equal to the reference; the generated tokens are unchanged (their
// solo runs), and a prompt asking only for logprobs (max_tokens 0) finishes by length with none.
TEST_F(PromptLogprobsTest, PromptLogprobsAreTheLogSoftmaxOfTheWholePromptsLogits) {
  rpc::MetricsRegistry registry("tiny");
  AttentionMetrics metrics(registry, weights_->config());

  // 16 pages of 4: the longest sequence alone (30 + 24 positions), far less than the 12
  // sequences' prompts and outputs together.
  auto scheduler = Scheduler::Create(*weights_, pool_, PromptOptions(16), nullptr, &metrics);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  constexpr int kRequests = 12;
  constexpr int64_t kMaxTokens = 24;
  std::vector<std::shared_ptr<Collector>> sinks;
  std::vector<SequenceParams> params;
  for (int i = 0; i < kRequests; ++i) {
    SequenceParams p;
    p.prompt = LongPrompt(i);
    p.max_tokens = i == 7 ? 0 : kMaxTokens;
    p.prompt_logprobs = i != 4;  // one without, beside the others
    p.prompt_top_logprobs = i % 3 == 0 ? 0 : i % 3 == 1 ? kMaxTopLogprobs : 3;
    params.push_back(p);
    sinks.push_back(std::make_shared<Collector>());
    ASSERT_TRUE((*scheduler)->Submit(std::move(p), sinks.back()).ok());
  }
  for (int i = 0; i < kRequests; ++i) {
    SCOPED_TRACE(::testing::Message() << "request " << i);
    ASSERT_TRUE(sinks[i]->Wait());
    ASSERT_TRUE(sinks[i]->status().ok()) << sinks[i]->status();
    if (!params[i].prompt_logprobs) {
      EXPECT_EQ(sinks[i]->prompt_logprob_calls(), 0);
      continue;
    }
    EXPECT_EQ(sinks[i]->prompt_logprob_calls(), 1);
    EXPECT_TRUE(sinks[i]->prompt_logprobs_before_tokens());
    ExpectMatchesReference(params[i].prompt, sinks[i]->prompt_logprobs(),
                           params[i].prompt_top_logprobs);
    if (params[i].max_tokens == 0) {
      EXPECT_TRUE(sinks[i]->tokens().empty());
      EXPECT_EQ(sinks[i]->reason(), FinishReason::kLength);
    } else {
      EXPECT_EQ(sinks[i]->tokens(), Solo(params[i].prompt, kMaxTokens));
    }
  }
  EXPECT_GT(metrics.scheduler().preemptions->Value(), 0) << "the budget never ran out";
  // Bad requests.
  SequenceParams bad;
  bad.prompt = LongPrompt(3);
  bad.prompt_logprobs = true;
  bad.prompt_top_logprobs = kMaxTopLogprobs + 1;
  EXPECT_EQ((*scheduler)->Submit(bad, std::make_shared<Collector>()).status().code(),
            absl::StatusCode::kInvalidArgument);
  bad.prompt_top_logprobs = 0;
  bad.prompt_logprobs = false;
  bad.max_tokens = 0;  // 0 only with prompt logprobs
  EXPECT_EQ((*scheduler)->Submit(bad, std::make_shared<Collector>()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A prompt alone takes as many prefill steps as the row cap makes it (its chunks shortened).
// With the prefix cache on, a prompt already cached (its pages committed by a first request)
// still gets every logprob: the second request computes the whole prompt, identical to the
// first, while a request without prompt logprobs does reuse the cached pages.
TEST_F(PromptLogprobsTest, CachedPromptsStillGetAllTheirLogprobs) {
  rpc::MetricsRegistry registry("tiny");
  AttentionMetrics metrics(registry, weights_->config());
  auto scheduler = Scheduler::Create(*weights_, pool_, PromptOptions(64), nullptr, &metrics);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  const std::vector<int32_t> prompt = LongPrompt(5);  // 30 tokens: 7 full pages
  auto run = [&](bool prompt_logprobs) {
    SequenceParams p;
    p.prompt = prompt;
    p.max_tokens = 4;
    p.prompt_logprobs = prompt_logprobs;
    p.prompt_top_logprobs = 4;
    auto sink = std::make_shared<Collector>();
    EXPECT_TRUE((*scheduler)->Submit(std::move(p), sink).ok());
    EXPECT_TRUE(sink->Wait());
    EXPECT_TRUE(sink->status().ok()) << sink->status();
    return sink;
  };
  const auto forward_passes = [&] {
    return metrics.scheduler().forward_time->Collect().histogram.sample_count;
  };
  const auto first = run(true);
  // Alone, its 29 prompt rows at most kRowCap (5) a step: 6 prefill steps where chunks of kChunk
  // (8) would take 4, then 3 decode steps.
  EXPECT_EQ(forward_passes(), 6u + 3u);
  const double hits_before = metrics.scheduler().prefix_cache_hits->Value();
  const auto second = run(true);
  EXPECT_EQ(metrics.scheduler().prefix_cache_hits->Value(), hits_before)
      << "a sequence asking for prompt logprobs took cached pages";
  ExpectMatchesReference(prompt, first->prompt_logprobs(), 4);
  const std::vector<TokenLogprobs> a = first->prompt_logprobs(), b = second->prompt_logprobs();
  ASSERT_EQ(a.size(), b.size());
  for (size_t p = 0; p < a.size(); ++p) {
    EXPECT_EQ(a[p].token_id, b[p].token_id);
    EXPECT_EQ(a[p].logprob, b[p].logprob) << "prompt token " << p + 1;
    ASSERT_EQ(a[p].top.size(), b[p].top.size());
    for (size_t k = 0; k < a[p].top.size(); ++k) {
      EXPECT_EQ(a[p].top[k].token_id, b[p].top[k].token_id);
      EXPECT_EQ(a[p].top[k].logprob, b[p].top[k].logprob);
    }
  }
  EXPECT_EQ(first->tokens(), second->tokens());
  // The pages were published: a plain request finds them.
  const auto plain = run(false);
  EXPECT_GE(metrics.scheduler().prefix_cache_hits->Value(), hits_before + 28);
  EXPECT_EQ(plain->tokens(), first->tokens());
}

// A long prompt asking for its logprobs is admitted beside decoding sequences that soon need
// its pages: being the youngest, it is preempted in the middle of its prefill (one prompt row
// per step makes that prefill 30 steps long), and recomputed later. The logprobs of the
// positions done before are neither computed again nor sent twice.
TEST_F(PromptLogprobsTest, PreemptedInThePrefillSendsEachLogprobOnce) {
  rpc::MetricsRegistry registry("tiny");
  AttentionMetrics metrics(registry, weights_->config());
  SchedulerOptions o = PromptOptions(16);
  o.max_prompt_logprob_rows = 1;
  auto scheduler = Scheduler::Create(*weights_, pool_, o, nullptr, &metrics);
  ASSERT_TRUE(scheduler.ok()) << scheduler.status();
  std::vector<std::shared_ptr<Collector>> decoders;
  SequenceParams p;
  p.prompt = LongPrompt(5);
  p.max_tokens = 4;
  p.prompt_logprobs = true;
  p.prompt_top_logprobs = 2;
  auto sink = std::make_shared<Collector>();
  // All submitted between two steps, so admitted together: the decoders take a page each, the
  // long prompt its 8 (and 3 of headroom); the decoders need 8 more pages each before it ends.
  ASSERT_TRUE((*scheduler)
                  ->RunBetweenSteps([&] {
                    for (int i = 0; i < 3; ++i) {
                      SequenceParams d;
                      d.prompt = {static_cast<int32_t>(3 + i), static_cast<int32_t>(11 + i)};
                      d.max_tokens = 20;
                      decoders.push_back(std::make_shared<Collector>());
                      EXPECT_TRUE((*scheduler)->Submit(std::move(d), decoders.back()).ok());
                    }
                    EXPECT_TRUE((*scheduler)->Submit(p, sink).ok());
                  })
                  .ok());
  ASSERT_TRUE(sink->Wait());
  ASSERT_TRUE(sink->status().ok()) << sink->status();
  EXPECT_EQ(sink->prompt_logprob_calls(), 1);
  ExpectMatchesReference(p.prompt, sink->prompt_logprobs(), 2);
  EXPECT_EQ(sink->tokens(), Solo(p.prompt, 4));
  for (auto& d : decoders) ASSERT_TRUE(d->Wait());
  EXPECT_GT(metrics.scheduler().preemptions->Value(), 0) << "the budget never ran out";
}

}  // namespace
}  // namespace dsmoe
