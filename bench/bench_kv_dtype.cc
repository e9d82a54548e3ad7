// F32 against BF16 KV pages (issue 19), side by side:
//   * decode tokens/s of the CPU runner at long contexts (default 2,048 and 8,192 cached
//     tokens per sequence, batches of 1 and 4 sequences), the median of `steps` steps;
//   * the tokens a fixed KV budget holds in each, for the preset and for deepseek-moe-16b.
// The cache is filled by writing random rows straight into it (KvCache::Write) instead of by a
// prefill: a decode step's time does not depend on the values it reads, and an 8,192-token
// prefill per configuration would take minutes on a small machine. Weights are BF16 (the
// checkpoint kind whose default is now BF16 KV); the F32 column is the kernels as before.
//
//   dsmoe_bench_kv_dtype [--preset small] [--contexts 2048,8192] [--batches 1,4] [--threads 2]
//                        [--steps 16] [--budget 1Gi-in-bytes] [--dir /tmp/dsmoe-bench]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_args.h"
#include "core/model/kv_cache.h"
#include "core/model/make_model.h"
#include "core/model/model_runner.h"
#include "core/model/sampler.h"
#include "core/model/weights.h"
#include "core/util/cpu_features.h"
#include "core/util/memory_limit.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;

// Median seconds of `steps` decode steps of B sequences at `context` cached positions each.
double DecodeStepSeconds(const ModelWeights& weights, ThreadPool& pool, KvDType kv_dtype,
                         int64_t context, int B, int64_t steps) {
  const ModelConfig& c = weights.config();
  RunnerOptions o;
  o.num_slots = B;
  o.max_context = context + steps + 1;
  o.max_batch_tokens = 256;
  o.kv_dtype = kv_dtype;
  auto runner = ModelRunner::Create(weights, pool, o);
  if (!runner.ok()) {
    std::fprintf(stderr, "%s\n", std::string(runner.status().message()).c_str());
    std::exit(1);
  }
  ModelRunner& r = **runner;
  // Positions [0, context) of every slot: random rows of a plausible scale, 256 at a time.
  const int64_t row = r.kv_cache().row_size(), chunk = 256;
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> k(chunk * row), v(chunk * row);
  for (float& x : k) x = normal(rng);
  for (float& x : v) x = normal(rng);
  std::vector<int32_t> ids(chunk, 0), slots(chunk), pos(chunk);
  for (int b = 0; b < B; ++b) {
    for (int64_t begin = 0; begin < context; begin += chunk) {
      const int64_t n = std::min(chunk, context - begin);
      for (int64_t i = 0; i < n; ++i) {
        slots[i] = b;
        pos[i] = static_cast<int32_t>(begin + i);
      }
      const ForwardBatch batch{
          std::span(ids).first(n), std::span(slots).first(n), std::span(pos).first(n), {}};
      if (!r.blocks().Reserve(batch.slots, batch.positions).ok()) std::exit(1);
      for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
        r.kv_cache().Write(layer, batch, k.data(), v.data());
      }
    }
  }
  std::vector<float> logits(static_cast<size_t>(B) * c.vocab_size);
  std::vector<int32_t> step_ids(B), step_slots(B), step_pos(B, static_cast<int32_t>(context)),
      rows(B);
  for (int b = 0; b < B; ++b) {
    step_ids[b] = 2 + b;
    step_slots[b] = b;
    rows[b] = b;
  }
  std::vector<double> secs;
  for (int64_t s = 0; s <= steps; ++s) {  // the first step warms up, and is not counted
    const auto t0 = Clock::now();
    if (!r.Forward({step_ids, step_slots, step_pos, rows}, logits.data()).ok()) std::exit(1);
    if (s > 0) secs.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
    for (int b = 0; b < B; ++b) {
      step_ids[b] = ArgMax(logits.data() + b * c.vocab_size, c.vocab_size);
      ++step_pos[b];
    }
  }
  std::nth_element(secs.begin(), secs.begin() + secs.size() / 2, secs.end());
  return secs[secs.size() / 2];
}

void PrintBudget(const std::string& name, const ModelConfig& c, int64_t budget) {
  BatchLimits l;
  l.kv_cache_bytes = budget;
  l.kv_page_tokens = 16;
  const int64_t f32 = *NumKvPages(c, l, KvElementBytes(KvDType::kF32)) * 16;
  const int64_t bf16 = *NumKvPages(c, l, KvElementBytes(KvDType::kBF16)) * 16;
  std::printf("| %s | %s | %s | %lld | %s | %lld | %.2fx |\n", name.c_str(),
              FormatBytes(budget).c_str(),
              FormatBytes(KvBytesPerToken(c, KvElementBytes(KvDType::kF32))).c_str(),
              static_cast<long long>(f32),
              FormatBytes(KvBytesPerToken(c, KvElementBytes(KvDType::kBF16))).c_str(),
              static_cast<long long>(bf16), static_cast<double>(bf16) / static_cast<double>(f32));
}

}  // namespace

int main(int argc, char** argv) {
  std::string preset = "small", contexts_arg = "2048,8192", batches_arg = "1,4",
              dir = "/tmp/dsmoe-bench";
  int threads = 2;
  int64_t steps = 16, budget = int64_t{1} << 30;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--preset")
      preset = value;
    else if (flag == "--contexts")
      contexts_arg = value;
    else if (flag == "--batches")
      batches_arg = value;
    else if (flag == "--threads")
      threads = std::stoi(value);
    else if (flag == "--steps")
      steps = std::stoll(value);
    else if (flag == "--budget")
      budget = std::stoll(value);
    else if (flag == "--dir")
      dir = value;
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (argc % 2 == 0 || steps < 1 || threads < 1 || budget < 1) {
    std::fprintf(stderr, "flags take one value each; --steps, --threads, --budget >= 1\n");
    return 2;
  }
  auto config = PresetConfig(preset);
  if (!config.ok()) return 2;
  const std::string model_dir = dir + "/" + preset + "-bf16";
  if (!std::filesystem::exists(model_dir + "/config.json")) {
    std::printf("writing %s ...\n", model_dir.c_str());
    std::fflush(stdout);
    if (!WriteRandomCheckpoint(*config, {DType::kBF16, 1, 1}, model_dir).ok()) return 1;
  }
  auto weights = ModelWeights::Load(model_dir);
  if (!weights.ok()) return 1;
  ThreadPool pool(threads);
  std::printf("kernels: %s; %s preset, bf16 weights, %d threads, median of %lld steps\n\n",
              GetCpuFeatures().ToString().c_str(), preset.c_str(), threads,
              static_cast<long long>(steps));
  std::printf(
      "| cached tokens per sequence | sequences | F32 KV tok/s | BF16 KV tok/s | BF16 / F32 "
      "|\n|---|---|---|---|---|\n");
  for (const std::string& ctx : bench::SplitList(contexts_arg)) {
    const int64_t context = std::stoll(ctx);
    for (const std::string& b : bench::SplitList(batches_arg)) {
      const int B = std::stoi(b);
      const double f32 = DecodeStepSeconds(**weights, pool, KvDType::kF32, context, B, steps);
      const double bf16 = DecodeStepSeconds(**weights, pool, KvDType::kBF16, context, B, steps);
      std::printf("| %lld | %d | %.1f | %.1f | %.2fx |\n", static_cast<long long>(context), B,
                  B / f32, B / bf16, f32 / bf16);
      std::fflush(stdout);
    }
  }

  std::printf(
      "\nTokens a KV budget holds (pages of 16):\n\n| model | budget | F32 bytes/token | "
      "F32 tokens | BF16 bytes/token | BF16 tokens | BF16 / F32 |\n"
      "|---|---|---|---|---|---|---|\n");
  PrintBudget(preset, *config, budget);
  ModelConfig big = *config;  // deepseek-moe-16b's attention shape: 28 layers, 16 × 128
  big.num_hidden_layers = 28;
  big.hidden_size = 2048;
  big.num_attention_heads = 16;
  big.num_key_value_heads = 16;
  PrintBudget("deepseek-moe-16b", big, int64_t{20} << 30);
  return 0;
}
