// F32 against BF16 KV pages (issue 19), side by side:
//   * decode tokens/s of the CPU runner at long contexts (default 2,048 and 8,192 cached
//     tokens per sequence, batches of 1 and 4 sequences), the median of `steps` steps;
//   * the decode attention kernel alone over one layer of deepseek-moe-16b's shape;
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
#include "core/ops/kernels.h"
#include "core/tensor/dtype.h"
#include "core/util/cpu_features.h"
#include "core/util/memory_limit.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;

struct StepTimes {
  double median, best;
};

// Seconds of `steps` decode steps of B sequences at `context` cached positions each.
StepTimes DecodeStepSeconds(const ModelWeights& weights, ThreadPool& pool, KvDType kv_dtype,
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
  std::sort(secs.begin(), secs.end());
  return {secs[secs.size() / 2], secs.front()};
}

// Best seconds of one decode attention (`attend`, one query) over every kv head of one layer of
// deepseek-moe-16b's shape (16 kv heads × 128) at `len` cached positions, on one thread: the
// kernel alone, reading the layer's K and V once. Pages of 16 positions laid out as KvCache
// lays them out ([page][kv_head][16][128]), or, with `interleaved`, as they were before
// ([page][16][kv_head · 128]: each head reads a 128-element slice of every 2,048-element row).
// Pages in order: the block table's scatter is not what this measures.
double AttendLayerSeconds(DType dtype, int64_t len, bool interleaved) {
  const int64_t heads = 16, hd = 128, row = heads * hd, page = 16;
  const size_t elements = static_cast<size_t>(len * row);
  std::vector<float> kf, vf;
  std::vector<uint16_t> kb, vb;
  std::mt19937 rng(2);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  if (dtype == DType::kF32) {
    kf.resize(elements);
    vf.resize(elements);
    for (size_t i = 0; i < elements; ++i) kf[i] = normal(rng), vf[i] = normal(rng);
  } else {
    kb.resize(elements);
    vb.resize(elements);
    for (size_t i = 0; i < elements; ++i) {
      kb[i] = F32ToBf16(normal(rng));
      vb[i] = F32ToBf16(normal(rng));
    }
  }
  std::vector<int32_t> table(len / page);
  for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<int32_t>(i);
  std::vector<float> q(hd, 0.1f), scores(len), out(hd);
  const ops::KernelTable& k = ops::Kernels();
  double best = 1e30;
  for (int rep = 0; rep < 7; ++rep) {
    const auto t0 = Clock::now();
    for (int64_t h = 0; h < heads; ++h) {
      ops::KvPages kv;
      kv.dtype = dtype;
      const int64_t head_offset = interleaved ? h * hd : h * page * hd;
      kv.keys = dtype == DType::kF32 ? static_cast<const void*>(kf.data() + head_offset)
                                     : static_cast<const void*>(kb.data() + head_offset);
      kv.values = dtype == DType::kF32 ? static_cast<const void*>(vf.data() + head_offset)
                                       : static_cast<const void*>(vb.data() + head_offset);
      kv.stride = interleaved ? row : hd;
      kv.pages = table.data();
      kv.page_shift = 4;
      kv.page_stride = page * row;
      k.attend(q.data(), kv, len, hd, 0.088f, scores.data(), out.data());
    }
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
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
  // Room for the longest context (the presets stop at 4,096 positions; RoPE extends as is).
  config->max_position_embeddings = 16384;
  const std::string model_dir = dir + "/" + preset + "-bf16-16k";
  if (!std::filesystem::exists(model_dir + "/config.json")) {
    std::printf("writing %s ...\n", model_dir.c_str());
    std::fflush(stdout);
    if (!WriteRandomCheckpoint(*config, {DType::kBF16, 1, 1}, model_dir).ok()) return 1;
  }
  auto weights = ModelWeights::Load(model_dir);
  if (!weights.ok()) return 1;
  ThreadPool pool(threads);
  std::printf("kernels: %s; %s preset, bf16 weights, %d threads, %lld steps\n\n",
              GetCpuFeatures().ToString().c_str(), preset.c_str(), threads,
              static_cast<long long>(steps));
  std::printf(
      "One decode attention over a layer of deepseek-moe-16b's shape (16 kv heads x 128, one "
      "query per head, one thread, best of 7), ms; pages of 16 with each head's rows together "
      "(the cache's layout) and, for comparison, with the heads interleaved in every row:\n\n"
      "| cached tokens | F32 KV | BF16 KV | BF16 speed-up | F32 KV interleaved | BF16 KV "
      "interleaved | F32 GB/s | BF16 GB/s |\n|---|---|---|---|---|---|---|---|\n");
  for (const std::string& ctx : bench::SplitList(contexts_arg)) {
    const int64_t len = std::stoll(ctx) / 16 * 16;
    const double f32 = AttendLayerSeconds(DType::kF32, len, false);
    const double bf16 = AttendLayerSeconds(DType::kBF16, len, false);
    const double f32_rows = AttendLayerSeconds(DType::kF32, len, true);
    const double bf16_rows = AttendLayerSeconds(DType::kBF16, len, true);
    const double elements = 2.0 * static_cast<double>(len) * 16 * 128;  // K and V
    std::printf("| %lld | %.2f | %.2f | %.2fx | %.2f | %.2f | %.1f | %.1f |\n",
                static_cast<long long>(len), f32 * 1e3, bf16 * 1e3, f32 / bf16, f32_rows * 1e3,
                bf16_rows * 1e3, elements * 4 / f32 / 1e9, elements * 2 / bf16 / 1e9);
    std::fflush(stdout);
  }

  std::printf(
      "\nDecode steps of the runner, tok/s of the median and of the best step:\n\n| cached "
      "tokens per sequence | sequences | F32 KV | BF16 KV | BF16 / F32 | F32 KV best | BF16 KV "
      "best | BF16 / F32 best |\n|---|---|---|---|---|---|---|---|\n");
  for (const std::string& ctx : bench::SplitList(contexts_arg)) {
    const int64_t context = std::stoll(ctx);
    for (const std::string& b : bench::SplitList(batches_arg)) {
      const int B = std::stoi(b);
      const StepTimes f32 = DecodeStepSeconds(**weights, pool, KvDType::kF32, context, B, steps);
      const StepTimes bf16 = DecodeStepSeconds(**weights, pool, KvDType::kBF16, context, B, steps);
      std::printf("| %lld | %d | %.1f | %.1f | %.2fx | %.1f | %.1f | %.2fx |\n",
                  static_cast<long long>(context), B, B / f32.median, B / bf16.median,
                  f32.median / bf16.median, B / f32.best, B / bf16.best, f32.best / bf16.best);
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
