// Automatic prefix caching on one attention server's scheduler (issue 19): N requests that
// share a long system prompt, each with a short question of its own, with the prefix cache on
// and off, side by side:
//   sequential: one request at a time (each arrives after the last finished): the first is
//               cold, the others find the system prompt cached: time to first token of the
//               first and the median of the rest;
//   burst:      all N at once, after one warm-up request: median and worst time to first
//               token, and the wall time until all finished;
// and, for each, the prompt tokens actually prefilled (dsmoe_prompt_tokens_total) and the
// prefix-cache hit tokens.
//
//   dsmoe_bench_prefix_cache [--preset small] [--dtype f32] [--threads 2] [--requests 8]
//                            [--system 1000] [--question 24] [--max-tokens 4]
//                            [--dir /tmp/dsmoe-bench] [--mmap-weights]
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "attention-server/attention_metrics.h"
#include "attention-server/scheduler.h"
#include "core/model/make_model.h"
#include "core/model/weights.h"
#include "core/rpc/metrics.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;

// Records when the first token arrived and when the sequence finished.
class TimingSink final : public SequenceSink {
 public:
  explicit TimingSink(Clock::time_point submitted) : submitted_(submitted) {}
  void OnToken(int32_t) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (first_ == Clock::time_point{}) first_ = Clock::now();
  }
  void OnFinish(FinishReason, const absl::Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    status_ = status;
    done_ = true;
    cv_.notify_all();
  }
  absl::Status Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
    return status_;
  }
  double ttft() {
    std::lock_guard<std::mutex> lock(mu_);
    return std::chrono::duration<double>(first_ - submitted_).count();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  Clock::time_point submitted_, first_{};
  absl::Status status_;
  bool done_ = false;
};

struct Figures {
  double first_ttft = 0, rest_ttft = 0;    // sequential: cold, median of the rest
  double burst_ttft = 0, burst_worst = 0;  // burst: median, worst
  double burst_wall = 0;
  double prefilled = 0, hits = 0, queried = 0;
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int64_t Flag(int argc, char** argv, const std::string& name, int64_t fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return std::stoll(argv[i + 1]);
  return fallback;
}

std::string StringFlag(int argc, char** argv, const std::string& name, std::string fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (argv[i] == name) return argv[i + 1];
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string preset = StringFlag(argc, argv, "--preset", "small");
  const std::string dtype_name = StringFlag(argc, argv, "--dtype", "f32");
  const std::string dir = StringFlag(argc, argv, "--dir", "/tmp/dsmoe-bench");
  const int threads = static_cast<int>(Flag(argc, argv, "--threads", 2));
  const int requests = static_cast<int>(Flag(argc, argv, "--requests", 8));
  const int64_t system = Flag(argc, argv, "--system", 1000);
  const int64_t question = Flag(argc, argv, "--question", 24);
  const int64_t max_tokens = Flag(argc, argv, "--max-tokens", 4);
  if (requests < 2 || system < 1 || question < 1 || max_tokens < 1 || threads < 1) {
    std::fprintf(stderr, "--requests >= 2; --system, --question, --max-tokens, --threads >= 1\n");
    return 2;
  }
  const DType dtype = dtype_name == "bf16" ? DType::kBF16 : DType::kF32;
  auto config = PresetConfig(preset);
  if (!config.ok()) {
    std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  const std::string model_dir = dir + "/" + preset + "-" + dtype_name;
  if (!std::filesystem::exists(model_dir + "/config.json")) {
    std::printf("writing %s ...\n", model_dir.c_str());
    if (!WriteRandomCheckpoint(*config, {dtype, 1, 1}, model_dir).ok()) return 1;
  }
  WeightLoadOptions load;  // placement chosen per start, or the file mapping when asked
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--mmap-weights")
      load.placement = WeightLoadOptions::Placement::kMap;
  }
  auto weights = ModelWeights::Load(model_dir, WeightSelection::Everything(), load);
  if (!weights.ok()) {
    std::fprintf(stderr, "%s\n", std::string(weights.status().message()).c_str());
    return 1;
  }
  const int32_t V = static_cast<int32_t>((*weights)->config().vocab_size);
  std::vector<int32_t> shared(static_cast<size_t>(system));
  for (int64_t j = 0; j < system; ++j) shared[j] = static_cast<int32_t>((j * 131 + 7) % V);
  auto prompt = [&](int round, int i) {
    std::vector<int32_t> p = shared;
    for (int64_t j = 0; j < question; ++j)
      p.push_back(static_cast<int32_t>((round * 7919 + i * 613 + j * 29 + 1) % V));
    return p;
  };

  ThreadPool pool(threads);
  auto run = [&](bool caching) -> absl::StatusOr<Figures> {
    rpc::MetricsRegistry registry(preset);
    AttentionMetrics metrics(registry, (*weights)->config());
    SchedulerOptions o;
    o.num_slots = requests;
    o.max_context = system + question + max_tokens + 1;
    o.max_batch_tokens = 256;
    o.enable_prefix_caching = caching;
    DSMOE_ASSIGN_OR_RETURN(auto scheduler,
                           Scheduler::Create(**weights, pool, o, nullptr, &metrics));
    auto submit = [&](std::vector<int32_t> p) -> absl::StatusOr<std::shared_ptr<TimingSink>> {
      SequenceParams params;
      params.prompt = std::move(p);
      params.max_tokens = max_tokens;
      auto sink = std::make_shared<TimingSink>(Clock::now());
      DSMOE_RETURN_IF_ERROR(scheduler->Submit(std::move(params), sink).status());
      return sink;
    };
    Figures f;
    std::vector<double> rest;
    for (int i = 0; i < requests; ++i) {
      DSMOE_ASSIGN_OR_RETURN(auto sink, submit(prompt(0, i)));
      DSMOE_RETURN_IF_ERROR(sink->Wait());
      if (i == 0) {
        f.first_ttft = sink->ttft();
      } else {
        rest.push_back(sink->ttft());
      }
    }
    f.rest_ttft = Median(rest);
    // The burst: new questions after the same system prompt (cached by now, if caching).
    std::vector<std::shared_ptr<TimingSink>> sinks;
    const auto t0 = Clock::now();
    for (int i = 0; i < requests; ++i) {
      DSMOE_ASSIGN_OR_RETURN(auto sink, submit(prompt(1, i)));
      sinks.push_back(std::move(sink));
    }
    std::vector<double> ttfts;
    for (auto& sink : sinks) {
      DSMOE_RETURN_IF_ERROR(sink->Wait());
      ttfts.push_back(sink->ttft());
    }
    f.burst_wall = std::chrono::duration<double>(Clock::now() - t0).count();
    f.burst_ttft = Median(ttfts);
    f.burst_worst = *std::max_element(ttfts.begin(), ttfts.end());
    const SchedulerMetrics& m = metrics.scheduler();
    f.prefilled = m.prompt_tokens->Value();
    f.hits = m.prefix_cache_hits->Value();
    f.queried = m.prefix_cache_queries->Value();
    return f;
  };

  std::printf(
      "\n%s %s, %d threads: %d requests sharing a %lld-token system prompt, %lld-token "
      "questions, %lld tokens each (machine noisy: other work runs beside it)\n\n",
      preset.c_str(), dtype_name.c_str(), threads, requests, static_cast<long long>(system),
      static_cast<long long>(question), static_cast<long long>(max_tokens));
  std::printf(
      "| prefix cache | sequential TTFT: 1st (cold) | others (median) | burst TTFT median | "
      "burst TTFT worst | burst wall | prompt tokens prefilled (of %lld) | cache hit tokens |\n"
      "|---|---|---|---|---|---|---|---|\n",
      static_cast<long long>(2 * requests * (system + question)));
  for (bool caching : {false, true}) {
    auto f = run(caching);
    if (!f.ok()) {
      std::fprintf(stderr, "%s\n", std::string(f.status().message()).c_str());
      return 1;
    }
    std::printf("| %s | %.3f s | %.3f s | %.3f s | %.3f s | %.3f s | %.0f | %.0f of %.0f |\n",
                caching ? "on" : "off", f->first_ttft, f->rest_ttft, f->burst_ttft, f->burst_worst,
                f->burst_wall, f->prefilled, f->hits, f->queried);
    std::fflush(stdout);
  }
  return 0;
}
