// Continuous batching on one attention server. One loop thread owns the BatchRunner (CPU or
// GPU): each step it admits waiting sequences into free slots while the KV cache has pages for
// their prompts, builds one batch of every running sequence's next token plus prompt chunks of
// newly admitted ones (within max_batch_tokens), runs the forward pass, samples per sequence,
// streams tokens to each sequence's sink, and frees the slot and pages of every sequence that
// finished — so requests join and leave between steps.
//
// Pages (core/model/block_manager.h): a sequence holds those of the positions it has reached.
// When a running sequence needs a page and none is free, the youngest running sequence (the
// latest arrival) is preempted: its pages are freed and it goes back to the head of the queue,
// to be recomputed from its prompt and the tokens it already produced (which its sink has heard
// and does not hear again). Nobody fails for want of pages; greedy output is unchanged.
//
// Prompt logprobs (SequenceParams.prompt_logprobs): the prefill chunks of such a sequence also
// ask the runner for the logits of its prompt positions, each turned at once into the logprob
// of the next prompt token (ComputeLogprobs, the definition of generated tokens' logprobs), and
// the sink hears them all once, before the first token. A step computes at most
// options.max_prompt_logprob_rows of those rows (a chunk is shortened to fit), so the logits
// buffer stays bounded; it grows to that size the first time a sequence asks, and a scheduler
// that never sees one keeps its one row per sequence. Such a sequence takes no cached prefix
// (the cached positions would have no logits); after a preemption the positions already
// computed are not computed or sent again.
//
// Prefix caching (options.enable_prefix_caching): at admission a sequence takes the cached
// pages of the longest cached prefix of its tokens (BlockManager::FindCachedPrefix) and starts
// its prefill after them; a new prompt's last token is always computed, for its logits. After
// each forward pass every page a sequence has filled is committed to the cache, prompt or
// generated, so later requests sharing a system prompt or a chat history skip that prefill, and
// a preempted sequence finds its own pages again unless they were evicted meanwhile.
//
// Thread-safe: Submit, Cancel, GetLoad and ComputeLogits may be called from any thread (the
// RPC handlers); only the loop thread touches the runner.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <span>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "attention-server/attention_metrics.h"
#include "core/model/generator.h"
#include "core/model/model_runner.h"
#include "core/model/sampler.h"
#include "core/util/status.h"

namespace dsmoe {

struct SequenceParams {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;  // eos ids included unless the request ignores eos
  bool logprobs = false;                // tell the sink each token's log-probability (OnLogprobs)
  int top_logprobs = 0;                 // and this many alternatives, in [0, kMaxTopLogprobs]
  // Tell the sink the logprob of every prompt token from the 2nd on (OnPromptLogprobs), with
  // prompt_top_logprobs alternatives each, in [0, kMaxTopLogprobs]. With it max_tokens may be 0:
  // the prompt is computed, its logprobs sent, and the sequence finishes (kLength) unsampled.
  bool prompt_logprobs = false;
  int prompt_top_logprobs = 0;
};

// Receives one sequence's output, on the scheduler's thread: implementations must not block.
class SequenceSink {
 public:
  virtual ~SequenceSink() = default;
  virtual void OnToken(int32_t id) = 0;
  // Only for a sequence that asked for logprobs: called just before OnToken of the same token.
  // `logprobs` is valid during the call only.
  virtual void OnLogprobs(const TokenLogprobs& logprobs) { (void)logprobs; }
  // Only for a sequence that asked for prompt logprobs, once: before its first OnToken (or its
  // OnFinish when max_tokens is 0). logprobs[i] is prompt token i + 1's. Valid during the call.
  virtual void OnPromptLogprobs(std::span<const TokenLogprobs> logprobs) { (void)logprobs; }
  // Last call. `status` is not OK when the sequence failed (it then carries the reason).
  virtual void OnFinish(FinishReason reason, const absl::Status& status) = 0;
};

// The runner's limits (num_slots: sequences running at once, a cap, not a reservation: the
// runner holds one more slot, the scratch slot of ComputeLogits; kv_cache_bytes: the pages'
// budget), and the queue's.
struct SchedulerOptions : BatchLimits {
  SchedulerOptions() { num_slots = 32; }
  int64_t max_waiting = 1024;  // accepted but not yet running; beyond: RESOURCE_EXHAUSTED
  // Reuse the KV pages of cached prefixes (see above). On by default: a hit is exact (tokens
  // and the whole chain of pages compared, not only a hash) and reads keys and values the same
  // model computed for the same positions; greedy output is identical with and without it.
  // Off whatever this says on a runner that does not support it (the GPU runner, for now).
  bool enable_prefix_caching = true;
  // Logits rows one step computes for prompt logprobs, all sequences together. A row is
  // vocab_size floats (400 KB for the real 102,400-token vocabulary) plus an lm_head product of
  // hidden_size x vocab_size: 32 rows bound the buffer to ~13 MB and a step's extra work to
  // about that of 32 decode rows; a longer prompt asking for them is fed over more steps.
  int64_t max_prompt_logprob_rows = 32;
};

struct SchedulerLoad {
  int64_t running = 0;
  int64_t waiting = 0;
  int64_t num_slots = 0;
};

class Scheduler {
 public:
  // REQUIRES: weights, pool, experts and metrics (if given) outlive the scheduler. With
  // metrics, the runner's routing is counted there and the scheduler keeps its gauges current.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(const ModelWeights& weights,
                                                           ThreadPool& pool,
                                                           const SchedulerOptions& options,
                                                           RoutedExpertExecutor* experts = nullptr,
                                                           AttentionMetrics* metrics = nullptr);
  // With a runner built by the caller (e.g. on a GPU). It must hold options.num_slots + 1 slots
  // (the last is ComputeLogits' scratch slot) and max_batch_tokens tokens per Forward.
  static absl::StatusOr<std::unique_ptr<Scheduler>> Create(std::unique_ptr<BatchRunner> runner,
                                                           const SchedulerOptions& options,
                                                           AttentionMetrics* metrics = nullptr);
  ~Scheduler();

  // Queues a sequence; its sink hears every token and then OnFinish exactly once.
  absl::StatusOr<uint64_t> Submit(SequenceParams params, std::shared_ptr<SequenceSink> sink);
  // Stops a sequence (waiting or running) and frees its slot before the next step. Its sink
  // gets OnFinish(kStop, CANCELLED) unless it had already finished (the status, not the
  // reason, tells a cancellation apart).
  void Cancel(uint64_t id);
  SchedulerLoad GetLoad() const;
  // Logits of every position of `ids` (a scratch slot; no state kept), run between steps.
  absl::StatusOr<std::vector<float>> ComputeLogits(std::vector<int32_t> ids);
  // Runs `fn` on the loop thread between two steps (no forward pass in flight; the next step
  // sees everything it did) and waits for it. UNAVAILABLE, without running it, if the scheduler
  // is shutting down. What a placement switch needs: every step sees one placement.
  absl::Status RunBetweenSteps(std::function<void()> fn);

  // Positions a sequence may reach: the runner's context, at most what all pages hold (so a
  // sequence alone always fits).
  int64_t max_context() const { return context_; }
  const ModelConfig& config() const { return runner_->config(); }

 private:
  struct Sequence {
    uint64_t id = 0;
    SequenceParams params;
    std::shared_ptr<SequenceSink> sink;
    std::unique_ptr<Sampler> sampler;
    int32_t slot = -1;
    int64_t fed = 0;  // tokens written to the KV cache
    int64_t generated = 0;
    std::vector<int32_t> output;  // tokens sampled, kept to recompute the cache after preemption
    int32_t last_token = -1;      // sampled, not yet fed
    TokenLogprobs logprobs;       // the last token's, when asked (reused: no allocation)
    // With params.prompt_logprobs: those of prompt positions [0, size()) so far (entry p is
    // prompt token p + 1's), kept across a preemption; released once sent.
    std::vector<TokenLogprobs> prompt_logprobs;
    bool prompt_logprobs_sent = false;
    bool cancelled = false;
    std::chrono::steady_clock::time_point arrived;
  };
  struct BetweenStepsJob {
    std::function<void()> fn;
    std::promise<void> done;
  };
  struct LogitsJob {
    std::vector<int32_t> ids;
    std::promise<absl::StatusOr<std::vector<float>>> result;
  };

  Scheduler(std::unique_ptr<BatchRunner> runner, const SchedulerOptions& options,
            AttentionMetrics* metrics);
  void Loop();
  void Step(std::vector<Sequence*>& running);
  void Finish(Sequence* seq, FinishReason reason, const absl::Status& status);
  // Hands the sink the prompt's logprobs (all computed) and marks them sent. Loop thread.
  void SendPromptLogprobs(Sequence& seq);
  // `running` (oldest first): who may be preempted for the scratch slot's pages.
  absl::StatusOr<std::vector<float>> RunLogitsJob(const std::vector<int32_t>& ids,
                                                  std::vector<Sequence*>& running);
  // Grows `slot` to hold `tokens` positions, preempting the youngest of `running` (its last)
  // while too few pages are free. False, having grown nothing, when `self` (the slot's
  // sequence, or null) was preempted itself or nobody is left to preempt.
  bool GrowPreempting(int32_t slot, int64_t tokens, Sequence* self,
                      std::vector<Sequence*>& running);
  // Admits the sequence into `slot` if pages allow: attaches its cached prefix (if caching is
  // on) and grows the slot to the positions it must prefill, keeping `headroom` pages free.
  // False, having taken nothing, when too few pages are free. Loop thread, under mu_.
  bool AdmitPages(Sequence& seq, int32_t slot, int64_t headroom);
  // Commits to the prefix cache the pages `seq` has filled since the last call. Loop thread.
  void CommitFullPages(const Sequence& seq);
  // Frees a running sequence's slot and pages and puts it back in the queue, by arrival.
  void Preempt(Sequence* seq);
  // Publishes running/waiting.
  void PublishLoadLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Publishes the KV cache's pages in use. Loop thread only.
  void PublishKvUsage();
  // Adds what the runner's profile gained since the last call to the phase counters. Loop
  // thread only.
  void CountPhases();

  std::unique_ptr<BatchRunner> runner_;
  SchedulerOptions options_;
  SchedulerMetrics* metrics_;      // null: no metrics
  int64_t context_;                // max_context()
  int32_t scratch_slot_;           // reserved for ComputeLogits
  ForwardProfile phases_counted_;  // the runner's profile as last exported; loop thread only

  // Queues `job` for the step loop and wakes it; UNAVAILABLE once stopping.
  template <class Job>
  absl::Status Enqueue(std::deque<Job*> Scheduler::*queue, Job* job) ABSL_LOCKS_EXCLUDED(mu_);

  mutable absl::Mutex mu_;
  absl::CondVar work_cv_;
  std::deque<std::unique_ptr<Sequence>> waiting_ ABSL_GUARDED_BY(mu_);
  std::unordered_map<uint64_t, std::unique_ptr<Sequence>> running_ ABSL_GUARDED_BY(mu_);
  std::vector<uint64_t> cancel_requests_ ABSL_GUARDED_BY(mu_);
  std::deque<LogitsJob*> logits_jobs_ ABSL_GUARDED_BY(mu_);
  std::deque<BetweenStepsJob*> between_steps_ ABSL_GUARDED_BY(mu_);
  std::vector<int32_t> free_slots_ ABSL_GUARDED_BY(mu_);
  uint64_t next_id_ ABSL_GUARDED_BY(mu_) = 1;
  bool stop_ ABSL_GUARDED_BY(mu_) = false;

  // Loop-thread state: the batch being built.
  std::vector<int32_t> batch_ids_, batch_slots_, batch_pos_, batch_rows_;
  std::vector<Sequence*> row_owner_;
  // Per logits row: the prompt position whose logprobs it gives, or -1 for a row to sample.
  std::vector<int32_t> row_prompt_pos_;
  std::vector<Sequence*> unsampled_;  // prompts complete this step with max_tokens 0
  std::vector<int64_t> fed_in_step_;
  std::vector<float> logits_;
  std::vector<int32_t> prefix_tokens_;  // a sequence's tokens, for the prefix-cache lookup
  std::thread loop_;
};

}  // namespace dsmoe
