#include "attention-server/scheduler.h"

#include <algorithm>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "attention-server/batch_runner_factory.h"

namespace dsmoe {
namespace {

// Positions a sequence must have in the cache before its next decode step: its prompt, and
// every sampled token but the last (fed by that step). Less than that after a preemption.
template <class Sequence>
int64_t Known(const Sequence& s) {
  return static_cast<int64_t>(s.params.prompt.size()) + std::max<int64_t>(s.generated - 1, 0);
}

template <class Sequence>
int32_t TokenAt(const Sequence& s, int64_t i) {
  const int64_t P = static_cast<int64_t>(s.params.prompt.size());
  return i < P ? s.params.prompt[i] : s.output[i - P];
}

// The sequence still needs logits rows for its prompt's logprobs.
template <class Sequence>
bool WantsPromptRows(const Sequence& s) {
  return s.params.prompt_logprobs && !s.prompt_logprobs_sent;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(const ModelWeights& weights,
                                                             ThreadPool& pool,
                                                             const SchedulerOptions& options,
                                                             RoutedExpertExecutor* experts,
                                                             AttentionMetrics* metrics) {
  DSMOE_ASSIGN_OR_RETURN(auto runner, CreateBatchRunner(Device{}, weights, pool, options, experts));
  return Create(std::move(runner), options, metrics);
}

absl::StatusOr<std::unique_ptr<Scheduler>> Scheduler::Create(std::unique_ptr<BatchRunner> runner,
                                                             const SchedulerOptions& options,
                                                             AttentionMetrics* metrics) {
  if (options.num_slots < 1 || options.max_batch_tokens < 1 || options.max_waiting < 0) {
    return absl::InvalidArgumentError("num_slots and max_batch_tokens must be >= 1");
  }
  if (options.max_prompt_logprob_rows < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_prompt_logprob_rows must be >= 1, got ",
                                                   options.max_prompt_logprob_rows));
  }
  // Set before the loop thread starts: the runner calls the observer from that thread only.
  if (metrics != nullptr) runner->set_routing_observer(&metrics->expert_load());
  return std::unique_ptr<Scheduler>(new Scheduler(std::move(runner), options, metrics));
}

Scheduler::Scheduler(std::unique_ptr<BatchRunner> runner, const SchedulerOptions& options,
                     AttentionMetrics* metrics)
    : runner_(std::move(runner)),
      options_(options),
      metrics_(metrics != nullptr ? &metrics->scheduler() : nullptr),
      context_(std::min(runner_->max_context(),
                        runner_->blocks().num_pages() * runner_->blocks().page_tokens())),
      scratch_slot_(static_cast<int32_t>(options.num_slots)) {
  options_.enable_prefix_caching =
      options.enable_prefix_caching && runner_->supports_prefix_caching();
  for (int64_t s = options.num_slots - 1; s >= 0; --s)
    free_slots_.push_back(static_cast<int32_t>(s));
  const int64_t B = options.max_batch_tokens;
  batch_ids_.reserve(B);
  batch_slots_.reserve(B);
  batch_pos_.reserve(B);
  batch_rows_.reserve(B);
  row_owner_.reserve(B);
  row_prompt_pos_.reserve(B);
  logits_.resize(
      static_cast<size_t>(std::min(options.num_slots, B) * runner_->config().vocab_size));
  loop_ = std::thread([this] { Loop(); });
}

Scheduler::~Scheduler() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  work_cv_.SignalAll();
  loop_.join();
  // Whatever is left is told it was aborted: no sequence ends silently.
  const absl::Status shutting_down =
      absl::UnavailableError("the attention server is shutting down");
  for (auto& s : waiting_) s->sink->OnFinish(FinishReason::kStop, shutting_down);
  for (auto& [id, s] : running_) s->sink->OnFinish(FinishReason::kStop, shutting_down);
  for (LogitsJob* job : logits_jobs_) job->result.set_value(shutting_down);
  for (BetweenStepsJob* job : between_steps_) job->done.set_value();  // not run: see stop_
}

absl::StatusOr<uint64_t> Scheduler::Submit(SequenceParams params,
                                           std::shared_ptr<SequenceSink> sink) {
  const int64_t V = runner_->config().vocab_size;
  const int64_t P = static_cast<int64_t>(params.prompt.size());
  if (P == 0) return absl::InvalidArgumentError("the prompt is empty");
  if (P >= max_context()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", P, " tokens leaves no room in the context of ", max_context(), " tokens"));
  }
  for (int32_t id : params.prompt) {
    if (id < 0 || id >= V) {
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the vocabulary [0, ", V, ")"));
    }
  }
  // 0: the prompt's logprobs are the whole answer.
  if (params.max_tokens < 1 && !(params.max_tokens == 0 && params.prompt_logprobs)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "max_tokens must be >= 1 (0 only with prompt_logprobs), got ", params.max_tokens));
  }
  DSMOE_RETURN_IF_ERROR(params.sampling.Validate());
  if (params.top_logprobs < 0 || params.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs,
                                                   "], got ", params.top_logprobs));
  }
  if (params.prompt_top_logprobs < 0 || params.prompt_top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", params.prompt_top_logprobs));
  }
  auto seq = std::make_unique<Sequence>();
  if (params.prompt_logprobs) seq->prompt_logprobs.reserve(static_cast<size_t>(P - 1));
  seq->sampler = std::make_unique<Sampler>(V, params.sampling);
  seq->params = std::move(params);
  seq->sink = std::move(sink);
  seq->arrived = std::chrono::steady_clock::now();
  uint64_t id;
  {
    absl::MutexLock lock(&mu_);
    if (stop_) return absl::UnavailableError("the attention server is shutting down");
    if (static_cast<int64_t>(waiting_.size()) >= options_.max_waiting) {
      return absl::ResourceExhaustedError(absl::StrCat(
          waiting_.size(), " sequences are already waiting (limit ", options_.max_waiting, ")"));
    }
    id = seq->id = next_id_++;
    waiting_.push_back(std::move(seq));
    PublishLoadLocked();
  }
  work_cv_.Signal();
  return id;
}

void Scheduler::Cancel(uint64_t id) {
  {
    absl::MutexLock lock(&mu_);
    cancel_requests_.push_back(id);
  }
  work_cv_.Signal();
}

SchedulerLoad Scheduler::GetLoad() const {
  absl::MutexLock lock(&mu_);
  return {static_cast<int64_t>(running_.size()), static_cast<int64_t>(waiting_.size()),
          options_.num_slots};
}

template <class Job>
absl::Status Scheduler::Enqueue(std::deque<Job*> Scheduler::*queue, Job* job) {
  {
    absl::MutexLock lock(&mu_);
    if (stop_) return absl::UnavailableError("the attention server is shutting down");
    (this->*queue).push_back(job);
  }
  work_cv_.Signal();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Scheduler::ComputeLogits(std::vector<int32_t> ids) {
  LogitsJob job;
  job.ids = std::move(ids);
  auto future = job.result.get_future();
  DSMOE_RETURN_IF_ERROR(Enqueue(&Scheduler::logits_jobs_, &job));
  return future.get();
}

absl::Status Scheduler::RunBetweenSteps(std::function<void()> fn) {
  BetweenStepsJob job;
  job.fn = std::move(fn);
  auto future = job.done.get_future();
  DSMOE_RETURN_IF_ERROR(Enqueue(&Scheduler::between_steps_, &job));
  future.wait();
  if (job.fn) return absl::UnavailableError("the attention server is shutting down");
  return absl::OkStatus();
}

void Scheduler::Finish(Sequence* seq, FinishReason reason, const absl::Status& status) {
  seq->sink->OnFinish(reason, status);
  if (metrics_ != nullptr) {
    (!status.ok()                      ? metrics_->finished_abort
     : reason == FinishReason::kLength ? metrics_->finished_length
                                       : metrics_->finished_stop)
        ->Increment();
  }
  runner_->ReleaseSlot(seq->slot);
  PublishKvUsage();
  absl::MutexLock lock(&mu_);
  free_slots_.push_back(seq->slot);
  running_.erase(seq->id);  // destroys *seq
  PublishLoadLocked();
}

void Scheduler::PublishLoadLocked() {
  if (metrics_ == nullptr) return;
  metrics_->running->Set(static_cast<double>(running_.size()));
  metrics_->waiting->Set(static_cast<double>(waiting_.size()));
}

void Scheduler::PublishKvUsage() {
  if (metrics_ == nullptr) return;
  const BlockManager& blocks = runner_->blocks();
  const double used = static_cast<double>(blocks.num_used_pages());
  metrics_->kv_pages_used->Set(used);
  metrics_->kv_pages_free->Set(static_cast<double>(blocks.num_free_pages()));
  metrics_->kv_cache_usage->Set(blocks.num_pages() > 0 ? used / blocks.num_pages() : 0.0);
  metrics_->prefix_cache_pages->Set(static_cast<double>(blocks.num_cached_pages()));
}

void Scheduler::Preempt(Sequence* seq) {
  runner_->ReleaseSlot(seq->slot);
  const int32_t slot = seq->slot;
  seq->slot = -1;
  seq->fed = 0;
  if (metrics_ != nullptr) metrics_->preemptions->Increment();
  PublishKvUsage();
  absl::MutexLock lock(&mu_);
  free_slots_.push_back(slot);
  auto it = running_.find(seq->id);
  std::unique_ptr<Sequence> owned = std::move(it->second);
  running_.erase(it);
  // Before every later arrival: it runs again as soon as pages allow.
  auto at = std::find_if(waiting_.begin(), waiting_.end(),
                         [&](const auto& w) { return w->id > owned->id; });
  waiting_.insert(at, std::move(owned));
  PublishLoadLocked();
}

bool Scheduler::AdmitPages(Sequence& seq, int32_t slot, int64_t headroom) {
  BlockManager& blocks = runner_->blocks();
  const int64_t known = Known(seq);
  CachedPrefix prefix;
  // Cached positions would have no logits: a sequence that still needs its prompt's logprobs
  // computes them all (its pages are committed as anyone's).
  if (options_.enable_prefix_caching && !WantsPromptRows(seq)) {
    prefix_tokens_.resize(static_cast<size_t>(known));
    for (int64_t i = 0; i < known; ++i) prefix_tokens_[i] = TokenAt(seq, i);
    // A new prompt's last token is computed whatever is cached: its logits give token 1, and
    // the page it lies in is then the sequence's own. A recomputed sequence already has its
    // next token: all it had may be found.
    const int64_t most = seq.generated == 0 ? known - 1 : known;
    prefix = blocks.FindCachedPrefix(prefix_tokens_, most);
  }
  // Cached pages nobody holds count as free until attached.
  const int64_t take =
      blocks.PagesFor(known) - static_cast<int64_t>(prefix.pages.size()) + prefix.unreferenced;
  if (take + headroom > blocks.num_free_pages()) return false;
  blocks.AttachPrefix(slot, prefix);
  if (!blocks.Grow(slot, known).ok()) {
    blocks.Release(slot);
    return false;
  }
  seq.fed = prefix.tokens;
  if (metrics_ != nullptr && options_.enable_prefix_caching && !WantsPromptRows(seq)) {
    metrics_->prefix_cache_queries->Increment(static_cast<double>(known));
    metrics_->prefix_cache_hits->Increment(static_cast<double>(prefix.tokens));
  }
  return true;
}

void Scheduler::CommitFullPages(const Sequence& seq) {
  BlockManager& blocks = runner_->blocks();
  const int64_t page = blocks.page_tokens();
  prefix_tokens_.resize(static_cast<size_t>(page));
  for (int64_t i = blocks.committed_pages(seq.slot); (i + 1) * page <= seq.fed; ++i) {
    for (int64_t j = 0; j < page; ++j) prefix_tokens_[j] = TokenAt(seq, i * page + j);
    blocks.CommitPage(seq.slot, prefix_tokens_);
  }
}

bool Scheduler::GrowPreempting(int32_t slot, int64_t tokens, Sequence* self,
                               std::vector<Sequence*>& running) {
  BlockManager& blocks = runner_->blocks();
  while (blocks.PagesNeeded(slot, tokens) > blocks.num_free_pages()) {
    if (running.empty()) return false;
    Sequence* victim = running.back();
    running.pop_back();
    Preempt(victim);
    if (victim == self) return false;
  }
  return blocks.Grow(slot, tokens).ok();
}

void Scheduler::Loop() {
  std::vector<Sequence*> running;
  for (;;) {
    LogitsJob* job = nullptr;
    std::deque<BetweenStepsJob*> between;
    std::vector<std::unique_ptr<Sequence>> cancelled_waiting;
    running.clear();
    {
      absl::MutexLock lock(&mu_);
      while (!stop_ && waiting_.empty() && running_.empty() && logits_jobs_.empty() &&
             cancel_requests_.empty() && between_steps_.empty()) {
        work_cv_.Wait(&mu_);
      }
      if (stop_) return;
      between.swap(between_steps_);
      for (uint64_t id : cancel_requests_) {
        if (auto it = running_.find(id); it != running_.end()) {
          it->second->cancelled = true;
          continue;
        }
        auto w = std::find_if(waiting_.begin(), waiting_.end(),
                              [id](const auto& s) { return s->id == id; });
        if (w != waiting_.end()) {
          cancelled_waiting.push_back(std::move(*w));
          waiting_.erase(w);
        }
      }
      cancel_requests_.clear();
      // Admission, first come first served: a slot, and pages for all the sequence prefills
      // (its prompt; after a preemption, also what it had produced) plus a page of headroom per
      // running sequence, so that their next pages do not at once preempt the newcomer.
      while (!free_slots_.empty() && !waiting_.empty()) {
        const int64_t headroom = static_cast<int64_t>(running_.size());
        const int32_t slot = free_slots_.back();
        if (!AdmitPages(*waiting_.front(), slot, headroom)) break;
        std::unique_ptr<Sequence> seq = std::move(waiting_.front());
        waiting_.pop_front();
        seq->slot = slot;
        free_slots_.pop_back();
        if (metrics_ != nullptr) {
          metrics_->queue_time->Observe(
              std::chrono::duration<double>(std::chrono::steady_clock::now() - seq->arrived)
                  .count());
        }
        const uint64_t id = seq->id;
        running_.emplace(id, std::move(seq));
      }
      if (!logits_jobs_.empty()) {
        job = logits_jobs_.front();
        logits_jobs_.pop_front();
      }
      for (auto& [id, seq] : running_) running.push_back(seq.get());
      PublishLoadLocked();
    }
    for (BetweenStepsJob* b : between) {
      b->fn();
      b->fn = nullptr;  // marks it run
      b->done.set_value();
    }
    const absl::Status cancelled = absl::CancelledError("the request was cancelled");
    for (auto& seq : cancelled_waiting) {
      seq->sink->OnFinish(FinishReason::kStop, cancelled);
      if (metrics_ != nullptr) metrics_->finished_abort->Increment();
    }
    // Oldest first: they get the prefill budget first and finish first.
    std::sort(running.begin(), running.end(),
              [](Sequence* a, Sequence* b) { return a->id < b->id; });
    std::vector<Sequence*> live;
    for (Sequence* seq : running) {
      if (seq->cancelled) {
        Finish(seq, FinishReason::kStop, cancelled);
      } else {
        live.push_back(seq);
      }
    }
    if (job != nullptr) job->result.set_value(RunLogitsJob(job->ids, live));
    PublishKvUsage();
    if (!live.empty()) Step(live);
  }
}

void Scheduler::Step(std::vector<Sequence*>& running) {
  const int64_t V = runner_->config().vocab_size;
  batch_ids_.clear();
  batch_slots_.clear();
  batch_pos_.clear();
  batch_rows_.clear();
  row_owner_.clear();
  row_prompt_pos_.clear();
  unsampled_.clear();
  // Pages for the decode steps, oldest first; a sequence that needs one when none is free
  // preempts the youngest (possibly itself, which then leaves `running`). Prompt chunks need
  // none: admission gave them their pages.
  for (size_t i = 0; i < running.size(); ++i) {
    Sequence* s = running[i];
    if (s->fed >= Known(*s)) GrowPreempting(s->slot, s->fed + 1, s, running);
  }
  fed_in_step_.assign(running.size(), 0);
  int64_t budget = options_.max_batch_tokens;
  // Decode steps first (one token each), then prompt chunks with what budget is left.
  for (size_t i = 0; i < running.size() && budget > 0; ++i) {
    Sequence* s = running[i];
    if (s->fed < Known(*s)) continue;
    batch_rows_.push_back(static_cast<int32_t>(batch_ids_.size()));
    row_owner_.push_back(s);
    row_prompt_pos_.push_back(-1);
    batch_ids_.push_back(s->last_token);
    batch_slots_.push_back(s->slot);
    batch_pos_.push_back(static_cast<int32_t>(s->fed));
    fed_in_step_[i] = 1;
    --budget;
  }
  int64_t prompt_rows_left = options_.max_prompt_logprob_rows;
  int64_t num_prompt_rows = 0;
  for (size_t i = 0; i < running.size() && budget > 0; ++i) {
    Sequence* s = running[i];
    const int64_t known = Known(*s);
    if (s->fed >= known) continue;
    int64_t n = std::min(budget, known - s->fed);
    // Prompt logprobs: a row for each position in [rows_from, rows_end) of this chunk, the
    // chunk shortened to the rows left this step (positions computed before a preemption have
    // theirs already).
    int64_t rows_from = 0, rows_end = 0;
    if (WantsPromptRows(*s)) {
      const int64_t P = static_cast<int64_t>(s->params.prompt.size());
      rows_from = std::max(s->fed, static_cast<int64_t>(s->prompt_logprobs.size()));
      if (rows_from < P - 1) n = std::min(n, rows_from + prompt_rows_left - s->fed);
      rows_end = std::min(s->fed + n, P - 1);
      if (n <= 0) continue;  // no rows left this step
      prompt_rows_left -= std::max<int64_t>(rows_end - rows_from, 0);
    }
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = s->fed + j;
      if (p >= rows_from && p < rows_end) {
        batch_rows_.push_back(static_cast<int32_t>(batch_ids_.size()));
        row_owner_.push_back(s);
        row_prompt_pos_.push_back(static_cast<int32_t>(p));
        ++num_prompt_rows;
      }
      batch_ids_.push_back(TokenAt(*s, p));
      batch_slots_.push_back(s->slot);
      batch_pos_.push_back(static_cast<int32_t>(p));
    }
    // The prompt is complete: its last token's logits give token 1. (A recomputed sequence
    // has its next token already: it decodes from the next step on.)
    if (s->fed + n == known && s->generated == 0) {
      if (s->params.max_tokens == 0) {
        unsampled_.push_back(s);
      } else {
        batch_rows_.push_back(static_cast<int32_t>(batch_ids_.size() - 1));
        row_owner_.push_back(s);
        row_prompt_pos_.push_back(-1);
      }
    }
    fed_in_step_[i] = n;
    budget -= n;
  }
  if (batch_ids_.empty()) return;
  // Prompt logprob rows beyond one per sequence: the buffer grows once, to its bound.
  if (batch_rows_.size() * V > logits_.size()) {
    logits_.resize(static_cast<size_t>(
        std::min(options_.num_slots + options_.max_prompt_logprob_rows, options_.max_batch_tokens) *
        V));
  }
  const auto start = std::chrono::steady_clock::now();
  const absl::Status status =
      runner_->Forward({batch_ids_, batch_slots_, batch_pos_, batch_rows_}, logits_.data());
  if (metrics_ != nullptr) {
    metrics_->forward_time->Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    metrics_->batch_tokens->Observe(static_cast<double>(batch_ids_.size()));
    CountPhases();
  }
  if (!status.ok()) {
    std::vector<Sequence*> affected;
    for (size_t i = 0; i < running.size(); ++i) {
      if (fed_in_step_[i] > 0) affected.push_back(running[i]);
    }
    if (affected.size() > 1 && status.code() == absl::StatusCode::kUnavailable) {
      // Some routed experts have no live server: only the sequences that need them must fail.
      // Each sequence runs this step alone (nothing was committed: `fed` is unchanged and the
      // KV-cache rows written are rewritten identically), so those that do not need the
      // missing experts go on unharmed. Costs one pass per sequence, and only on failure.
      for (Sequence* seq : affected) {
        std::vector<Sequence*> one = {seq};
        Step(one);
      }
      return;
    }
    for (Sequence* seq : affected) Finish(seq, FinishReason::kStop, status);
    return;
  }
  for (size_t i = 0; i < running.size(); ++i) {
    running[i]->fed += fed_in_step_[i];
    if (options_.enable_prefix_caching && fed_in_step_[i] > 0) CommitFullPages(*running[i]);
  }
  if (metrics_ != nullptr) {
    // Every token fed is held in the KV cache; decode rows are one per sequence, the rest prompt.
    const int64_t fed = static_cast<int64_t>(batch_ids_.size());
    int64_t decode = 0;
    for (size_t i = 0; i < running.size(); ++i) {
      if (fed_in_step_[i] == 1 &&
          running[i]->fed > static_cast<int64_t>(running[i]->params.prompt.size()))
        ++decode;
    }
    metrics_->prompt_tokens->Increment(static_cast<double>(fed - decode));
    metrics_->generation_tokens->Increment(
        static_cast<double>(static_cast<int64_t>(row_owner_.size()) - num_prompt_rows));
    PublishKvUsage();
  }
  for (size_t r = 0; r < row_owner_.size(); ++r) {
    Sequence* s = row_owner_[r];
    const float* row = logits_.data() + r * V;
    if (const int32_t p = row_prompt_pos_[r]; p >= 0) {
      // Rows come in position order: entry p is appended here.
      ComputeLogprobs(row, V, s->params.prompt[p + 1], s->params.prompt_top_logprobs,
                      &s->prompt_logprobs.emplace_back());
      continue;
    }
    if (WantsPromptRows(*s)) SendPromptLogprobs(*s);
    const int32_t token = s->sampler->Sample(row);
    s->last_token = token;
    s->output.push_back(token);
    ++s->generated;
    if (s->params.logprobs) {
      ComputeLogprobs(row, V, token, s->params.top_logprobs, &s->logprobs);
      s->sink->OnLogprobs(s->logprobs);
    }
    s->sink->OnToken(token);
    const auto& stops = s->params.stop_token_ids;
    if (std::find(stops.begin(), stops.end(), token) != stops.end()) {
      Finish(s, FinishReason::kStop, absl::OkStatus());
    } else if (s->generated >= s->params.max_tokens || s->fed + 1 >= max_context()) {
      Finish(s, FinishReason::kLength, absl::OkStatus());
    }
  }
  // Prompts asked for their logprobs only (max_tokens 0). None of them had a row to sample,
  // so none was finished above.
  for (Sequence* s : unsampled_) {
    SendPromptLogprobs(*s);
    Finish(s, FinishReason::kLength, absl::OkStatus());
  }
}

void Scheduler::SendPromptLogprobs(Sequence& seq) {
  seq.sink->OnPromptLogprobs(seq.prompt_logprobs);
  seq.prompt_logprobs_sent = true;
  std::vector<TokenLogprobs>().swap(seq.prompt_logprobs);  // not needed again
}

absl::StatusOr<std::vector<float>> Scheduler::RunLogitsJob(const std::vector<int32_t>& ids,
                                                           std::vector<Sequence*>& running) {
  const int64_t T = static_cast<int64_t>(ids.size()), V = runner_->config().vocab_size;
  if (T == 0) return absl::InvalidArgumentError("no tokens");
  if (T > max_context()) {
    return absl::InvalidArgumentError(
        absl::StrCat(T, " tokens exceed the context of ", max_context()));
  }
  for (int32_t id : ids) {
    if (id < 0 || id >= V)
      return absl::InvalidArgumentError(
          absl::StrCat("token id ", id, " is outside the vocabulary"));
  }
  std::vector<float> out(static_cast<size_t>(T * V));
  const int64_t chunk = options_.max_batch_tokens;
  std::vector<int32_t> slots(chunk, scratch_slot_), pos(chunk), rows(chunk);
  // The scratch slot's cache is released however the job ends.
  struct Release {
    BatchRunner* runner;
    int32_t slot;
    ~Release() { runner->ReleaseSlot(slot); }
  } release{runner_.get(), scratch_slot_};
  for (int64_t begin = 0; begin < T; begin += chunk) {
    const int64_t n = std::min(chunk, T - begin);
    if (!GrowPreempting(scratch_slot_, begin + n, nullptr, running)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("the KV cache has no pages for ", begin + n, " positions"));
    }
    for (int64_t i = 0; i < n; ++i) {
      pos[i] = static_cast<int32_t>(begin + i);
      rows[i] = static_cast<int32_t>(i);
    }
    DSMOE_RETURN_IF_ERROR(
        runner_->Forward({std::span(ids).subspan(begin, n), std::span(slots).first(n),
                          std::span(pos).first(n), std::span(rows).first(n)},
                         out.data() + begin * V));
  }
  return out;
}

void Scheduler::CountPhases() {
  const ForwardProfile* profile = runner_->profile();
  if (profile == nullptr) return;
  for (size_t p = 0; p < profile->seconds.size(); ++p) {
    const double added = profile->seconds[p] - phases_counted_.seconds[p];
    if (added > 0) metrics_->phase_seconds[p]->Increment(added);
  }
  phases_counted_ = *profile;
}

}  // namespace dsmoe
