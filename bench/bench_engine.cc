// The single-process engine against this machine's limits, in one run:
//   machine:  read bandwidth (1..N threads; 1-16 streams per thread; huge and 4 KiB pages), the
//             rate the decode kernel itself reads, the register-only FMA peak, the FMA rate of
//             dsmoe's GEMM kernel and of OpenBLAS sgemm (when built with it);
//   per preset × dtype × threads: decode tokens/s at batch 1/4/16/64 (median step), batch-1
//             decode as `dsmoe generate` runs it (Generate(), timed between streamed tokens),
//             prefill tokens/s of a 512-token prompt (best of 3), weight bytes read per decoded
//             token, the fraction of the roofline reached (bandwidth for batch-1 decode, GEMM
//             rate for prefill), prefill against the sgemm-bound rate (OpenBLAS GFLOP/s /
//             2·active parameters per token), and peak resident memory per model against its
//             weights on disk + KV cache.
//
//   dsmoe_bench_engine [--presets small,medium] [--dtypes f32,bf16,q8] [--threads 1,2]
//                      [--batches 1,4,16,64] [--prompt 512] [--steps 16] [--mmap-weights]
//                      [--dir /tmp/dsmoe-bench]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "bench/bench_args.h"
#include "bench/machine_probe.h"
#include "core/model/generator.h"
#include "core/model/make_model.h"
#include "core/model/model_facts.h"
#include "core/model/model_runner.h"
#include "core/model/quantize.h"
#include "core/model/sampler.h"
#include "core/model/weights.h"
#include "core/ops/kernels.h"
#include "core/util/cpu_features.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;

// Weight bytes a batch-1 decode step reads (core/model/model_facts.h).
double DecodeBytesPerToken(const ModelConfig& c, double bytes_per_weight) {
  const DecodeWeights w = CountDecodeWeights(c);
  return static_cast<double>(w.matrices + w.routers) * bytes_per_weight;
}

// Counts the distinct routed experts each MoE layer runs per forward pass: at batch B a step
// reads every expert some token chose, once (the grouped expert FFN), which bounds what
// batching can gain when routing is spread over many experts.
class DistinctExperts final : public RoutingObserver {
 public:
  explicit DistinctExperts(int64_t num_experts) : seen_(num_experts) {}
  void OnRouting(int64_t, int64_t T, int64_t k, const int32_t* experts, const float*) override {
    std::fill(seen_.begin(), seen_.end(), 0);
    for (int64_t i = 0; i < T * k; ++i) {
      if (!seen_[experts[i]]) {
        seen_[experts[i]] = 1;
        ++total_;
      }
    }
    ++layers_;
  }
  void Reset() { total_ = layers_ = 0; }
  double PerLayer() const { return layers_ ? static_cast<double>(total_) / layers_ : 0; }

 private:
  std::vector<char> seen_;
  int64_t total_ = 0, layers_ = 0;
};

// Peak resident memory since the last ResetPeakResident (VmHWM of /proc/self/status), bytes.
double PeakResidentBytes() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) * 1024.0;  // kB
  }
  return 0;
}
// Writing 5 to clear_refs resets the peak to the current resident size (Linux ≥ 4.0).
void ResetPeakResident() { std::ofstream("/proc/self/clear_refs") << "5"; }

// Bytes of the checkpoint's files (config, safetensors shards, tokenizer) on disk.
double BytesOnDisk(const std::string& dir) {
  double total = 0;
  for (const auto& entry : std::filesystem::directory_iterator(dir))
    if (entry.is_regular_file()) total += static_cast<double>(entry.file_size());
  return total;
}

// A model's memory while it serves: peak resident against weights on disk + KV cache.
struct Memory {
  std::string preset, dtype;
  double disk, kv_cache, peak;
};

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Batch-1 decode as `dsmoe generate` runs it (the same Generate() call, sampling and all),
// timed between the streamed tokens: what a user sees, beside the bench's median step.
struct GenerateTiming {
  double mean_tps = 0;    // tokens after the first / their time
  double median_tps = 0;  // 1 / the median gap between consecutive tokens
};

GenerateTiming TimeGenerate(ModelRunner& runner, const GenerationConfig& generation, int64_t V,
                            int64_t steps) {
  GenerateRequest request;
  for (int i = 0; i < 8; ++i) request.prompt.push_back(static_cast<int32_t>(5 + i * 13 % (V - 5)));
  request.max_tokens = steps + 1;
  request.ignore_eos = true;
  std::vector<Clock::time_point> stamps;
  stamps.reserve(steps + 1);
  auto result =
      Generate(runner, generation, request, 0, [&](int32_t) { stamps.push_back(Clock::now()); });
  if (!result.ok() || stamps.size() < 3) return {};
  std::vector<double> gaps;
  for (size_t i = 1; i < stamps.size(); ++i)
    gaps.push_back(std::chrono::duration<double>(stamps[i] - stamps[i - 1]).count());
  const double total = std::chrono::duration<double>(stamps.back() - stamps.front()).count();
  std::nth_element(gaps.begin(), gaps.begin() + gaps.size() / 2, gaps.end());
  return {static_cast<double>(gaps.size()) / total, 1.0 / gaps[gaps.size() / 2]};
}

struct Result {
  std::string preset, dtype;
  int threads;
  std::vector<double> decode_tps;         // per batch size
  std::vector<double> experts_per_layer;  // distinct routed experts per MoE layer per step
  double prefill_tps;
  double bytes_per_token;
  GenerateTiming generate;
};

}  // namespace

int main(int argc, char** argv) {
  std::string presets = "small,medium", dtypes = "f32,bf16,q8", threads_arg = "1,2",
              batches_arg = "1,4,16,64", dir = "/tmp/dsmoe-bench";
  int64_t prompt_len = 512, steps = 16;
  bool mmap_weights = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--mmap-weights") {
      mmap_weights = true;
      continue;
    }
    if (i + 1 >= argc) {
      std::fprintf(stderr, "%s needs a value\n", flag.c_str());
      return 2;
    }
    const std::string value = argv[++i];
    if (flag == "--presets")
      presets = value;
    else if (flag == "--dtypes")
      dtypes = value;
    else if (flag == "--threads")
      threads_arg = value;
    else if (flag == "--batches")
      batches_arg = value;
    else if (flag == "--dir")
      dir = value;
    else if (flag == "--prompt")
      prompt_len = std::stoll(value);
    else if (flag == "--steps")
      steps = std::stoll(value);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (steps < 1 || prompt_len < 1) {
    std::fprintf(stderr, "--steps and --prompt must be at least 1\n");
    return 2;
  }
  std::vector<int> thread_counts, batches;
  for (const auto& t : bench::SplitList(threads_arg)) thread_counts.push_back(std::stoi(t));
  for (const auto& b : bench::SplitList(batches_arg)) batches.push_back(std::stoi(b));

  std::printf("kernels: %s table; CPU: %s; weights in %s\n\n", ops::Kernels().name,
              GetCpuFeatures().ToString().c_str(),
              mmap_weights ? "the file mapping" : "an anonymous huge-page copy");
  std::printf(
      "| threads | read GB/s (huge pages, best of 1-16 streams) | read GB/s (4 KiB pages) | "
      "decode kernel GB/s (BF16 GEMV, 1 GiB) | FMA peak GFLOP/s (registers only) | dsmoe GEMM "
      "GFLOP/s | OpenBLAS sgemm GFLOP/s |\n|---|---|---|---|---|---|---|\n");
  // The roofline's bandwidth: the most any read reached, the decode kernel's own included, so
  // that no decode can claim more than 100% of it by reading in a way the probe does not.
  std::vector<double> bandwidth(thread_counts.size()), gemm(thread_counts.size()),
      sgemm(thread_counts.size()), peak(thread_counts.size());
  for (size_t i = 0; i < thread_counts.size(); ++i) {
    ThreadPool pool(thread_counts[i]);
    int streams = 0;
    const double huge = bench::ReadBandwidth(pool, size_t{1} << 30, true, &streams);
    const double plain = bench::ReadBandwidth(pool, size_t{1} << 30, false);
    const double gemv = bench::GemvBandwidth(pool, size_t{1} << 30);
    bandwidth[i] = std::max(huge, gemv);
    gemm[i] = bench::GemmRate(pool);
    sgemm[i] = bench::SgemmRate(thread_counts[i]);
    peak[i] = bench::FmaPeak(pool);
    std::printf("| %d | %.1f (%d streams) | %.1f | %.1f | %.1f | %.1f | %.1f |\n", thread_counts[i],
                huge, streams, plain, gemv, peak[i], gemm[i], sgemm[i]);
  }
  std::fflush(stdout);

  std::vector<Result> results;
  std::vector<Memory> memories;
  for (const std::string& preset : bench::SplitList(presets)) {
    for (const std::string& dtype_name : bench::SplitList(dtypes)) {
      // "q8" is the Q8_0 quantization (dsmoe quantize) of the BF16 checkpoint.
      const bool q8 = dtype_name == "q8";
      const DType dtype = dtype_name == "bf16" || q8 ? DType::kBF16
                          : dtype_name == "f16"      ? DType::kF16
                                                     : DType::kF32;
      const std::string source_dir =
          dir + "/" + preset + "-" + (q8 ? std::string("bf16") : dtype_name);
      const std::string model_dir = dir + "/" + preset + "-" + dtype_name;
      auto config = PresetConfig(preset);
      if (!config.ok()) return 1;
      if (!std::filesystem::exists(source_dir + "/config.json")) {
        std::printf("writing %s ...\n", source_dir.c_str());
        std::fflush(stdout);
        if (!WriteRandomCheckpoint(*config, {dtype, 1, 1}, source_dir).ok()) return 1;
      }
      if (q8 && !std::filesystem::exists(model_dir + "/config.json")) {
        std::printf("quantizing %s ...\n", model_dir.c_str());
        std::fflush(stdout);
        if (!QuantizeCheckpoint(source_dir, model_dir).ok()) return 1;
      }
      ResetPeakResident();  // this model's peak alone, not the probes' or the last model's
      const double resident_before = PeakResidentBytes();
      Memory memory{preset, dtype_name, BytesOnDisk(model_dir), 0, 0};
      WeightLoadOptions load;
      load.placement =
          mmap_weights ? WeightLoadOptions::Placement::kMap : WeightLoadOptions::Placement::kCopy;
      load.logger = nullptr;  // stdout is the table
      auto weights = ModelWeights::Load(model_dir, WeightSelection::Everything(), load);
      if (!weights.ok()) {
        std::fprintf(stderr, "%s\n", std::string(weights.status().message()).c_str());
        return 1;
      }
      const ModelConfig& c = (*weights)->config();
      const int64_t V = c.vocab_size;
      const int max_batch = *std::max_element(batches.begin(), batches.end());
      for (int threads : thread_counts) {
        ThreadPool pool(threads);
        RunnerOptions options;
        options.num_slots = max_batch;
        options.max_context = prompt_len + steps + 16;
        options.max_batch_tokens = 256;
        auto runner = ModelRunner::Create(**weights, pool, options);
        if (!runner.ok()) return 1;
        ModelRunner& r = **runner;
        memory.kv_cache = std::max(memory.kv_cache, static_cast<double>(r.kv_cache().NumBytes()));
        DistinctExperts distinct(std::max<int64_t>(c.n_routed_experts, 1));
        std::vector<float> logits(static_cast<size_t>(std::max<int64_t>(max_batch, 256)) * V);
        const double bytes_per_weight =
            q8 ? (kQ8Block + 2.0) / kQ8Block : static_cast<double>(DTypeSize(dtype));
        Result res{
            preset, dtype_name, threads, {}, {}, 0, DecodeBytesPerToken(c, bytes_per_weight)};

        // Prefill: one prompt of prompt_len tokens, in chunks of 256, logits of the last only.
        std::vector<int32_t> ids(256), slots(256, 0), pos(256);
        auto prefill = [&]() {
          for (int64_t begin = 0; begin < prompt_len; begin += 256) {
            const int64_t n = std::min<int64_t>(256, prompt_len - begin);
            for (int64_t i = 0; i < n; ++i) {
              ids[i] = static_cast<int32_t>(2 + ((begin + i) * 7919) % (V - 2));
              pos[i] = static_cast<int32_t>(begin + i);
            }
            const int32_t last = static_cast<int32_t>(n - 1);
            (void)r.Forward(
                {std::span(ids).first(n), std::span(slots).first(n), std::span(pos).first(n),
                 begin + n == prompt_len ? std::span<const int32_t>(&last, 1)
                                         : std::span<const int32_t>()},
                logits.data());
          }
        };
        // Best of 3 after a warm-up (every weight page touched once), as the machine probes take
        // their best: on a shared machine a run that another process interrupted says little.
        prefill();
        double prefill_secs = 1e30;
        for (int rep = 0; rep < 3; ++rep) {
          const auto t0 = Clock::now();
          prefill();
          prefill_secs = std::min(prefill_secs, Seconds(t0));
        }
        res.prefill_tps = static_cast<double>(prompt_len) / prefill_secs;

        // Decode at each batch size: B sequences with 8-token prompts, then `steps` steps.
        for (int B : batches) {
          std::vector<int32_t> bid, bslot, bpos, rows;
          for (int b = 0; b < B; ++b) {
            for (int i = 0; i < 8; ++i) {
              bid.push_back(static_cast<int32_t>(3 + (b * 31 + i * 17) % (V - 3)));
              bslot.push_back(b);
              bpos.push_back(i);
            }
            rows.push_back(static_cast<int32_t>(bid.size() - 1));
          }
          for (size_t begin = 0; begin < bid.size(); begin += 256) {  // prompts, in chunks
            const size_t n = std::min<size_t>(256, bid.size() - begin);
            std::vector<int32_t> chunk_rows;
            for (int32_t row : rows) {
              if (row >= static_cast<int32_t>(begin) && row < static_cast<int32_t>(begin + n))
                chunk_rows.push_back(row - static_cast<int32_t>(begin));
            }
            (void)r.Forward({std::span(bid).subspan(begin, n), std::span(bslot).subspan(begin, n),
                             std::span(bpos).subspan(begin, n), chunk_rows},
                            logits.data());
          }
          std::vector<int32_t> step_ids(B), step_slots(B), step_pos(B, 8), step_rows(B);
          for (int b = 0; b < B; ++b) {
            step_slots[b] = b;
            step_rows[b] = b;
            step_ids[b] = ArgMax(logits.data() + b * V, V);
          }
          distinct.Reset();
          r.set_routing_observer(&distinct);
          // The median step: robust to the steps another process interrupted.
          std::vector<double> step_secs;
          for (int64_t s = 0; s < steps; ++s) {
            const auto t0 = Clock::now();
            (void)r.Forward({step_ids, step_slots, step_pos, step_rows}, logits.data());
            step_secs.push_back(Seconds(t0));
            for (int b = 0; b < B; ++b) {
              step_ids[b] = ArgMax(logits.data() + b * V, V);
              ++step_pos[b];
            }
          }
          std::nth_element(step_secs.begin(), step_secs.begin() + steps / 2, step_secs.end());
          res.decode_tps.push_back(static_cast<double>(B) / step_secs[steps / 2]);
          r.set_routing_observer(nullptr);
          res.experts_per_layer.push_back(distinct.PerLayer());
        }
        res.generate = TimeGenerate(r, (*weights)->generation_config(), V, steps);
        results.push_back(res);
        memory.peak = std::max(memory.peak, PeakResidentBytes() - resident_before);
        std::printf("%s %s threads=%d: prefill %.1f tok/s, decode", preset.c_str(),
                    dtype_name.c_str(), threads, res.prefill_tps);
        for (size_t i = 0; i < batches.size(); ++i)
          std::printf(" b%d %.1f", batches[i], res.decode_tps[i]);
        std::printf(" tok/s; generate() b1 %.1f tok/s (mean of streamed tokens)\n",
                    res.generate.mean_tps);
        std::fflush(stdout);
      }
      memories.push_back(memory);
    }
  }

  std::printf(
      "\nMemory while serving (peak resident of the process above what it held before loading "
      "the model):\n\n| preset | dtype | weights on disk | KV cache | peak resident | peak / "
      "(disk + KV cache) |\n|---|---|---|---|---|---|\n");
  for (const Memory& m : memories) {
    std::printf("| %s | %s | %.0f MB | %.0f MB | %.0f MB | %.3f |\n", m.preset.c_str(),
                m.dtype.c_str(), m.disk / 1e6, m.kv_cache / 1e6, m.peak / 1e6,
                m.peak / (m.disk + m.kv_cache));
  }

  std::printf(
      "\nBatch decode reads each chosen expert once per step. Distinct routed experts per MoE "
      "layer per step, and the\n"
      "decode tokens/s the measured bandwidth allows at that batch (weights read per step / "
      "batch):\n\n");
  std::printf("| preset | dtype | threads |");
  for (int b : batches)
    std::printf(" b%d experts/layer | b%d roofline tok/s | b%d measured |", b, b, b);
  std::printf("\n|---|---|---|");
  for (size_t i = 0; i < batches.size(); ++i) std::printf("---|---|---|");
  std::printf("\n");
  for (const Result& r : results) {
    const size_t ti =
        std::find(thread_counts.begin(), thread_counts.end(), r.threads) - thread_counts.begin();
    const ModelConfig c = *PresetConfig(r.preset);
    const double per_weight = r.bytes_per_token / DecodeBytesPerToken(c, 1.0);
    const double expert_bytes = 3.0 * c.hidden_size * c.moe_intermediate_size * per_weight;
    std::printf("| %s | %s | %d |", r.preset.c_str(), r.dtype.c_str(), r.threads);
    for (size_t i = 0; i < batches.size(); ++i) {
      // Bytes of one step: the batch-1 bytes with top-k experts replaced by the distinct ones.
      const double step_bytes =
          r.bytes_per_token +
          c.NumMoeLayers() * (r.experts_per_layer[i] - c.num_experts_per_tok) * expert_bytes;
      std::printf(" %.1f | %.1f | %.1f |", r.experts_per_layer[i],
                  bandwidth[ti] * 1e9 / step_bytes * batches[i], r.decode_tps[i]);
    }
    std::printf("\n");
  }
  std::printf(
      "\n| preset | dtype | threads | weights/token | decode b1 tok/s (median step) | generate() "
      "b1 tok/s (mean, streamed) | generate / step | b1 %% of bandwidth roofline |");
  for (size_t i = 1; i < batches.size(); ++i) std::printf(" decode b%d tok/s |", batches[i]);
  std::printf(
      " prefill %lld tok/s | prefill %% of GEMM roofline | prefill / sgemm-bound rate "
      "|\n|---|---|---|---|---|---|---|---|",
      (long long)prompt_len);
  for (size_t i = 1; i < batches.size(); ++i) std::printf("---|");
  std::printf("---|---|---|\n");
  for (const Result& r : results) {
    const size_t ti =
        std::find(thread_counts.begin(), thread_counts.end(), r.threads) - thread_counts.begin();
    const ModelConfig c = *PresetConfig(r.preset);
    const double roofline_tps = bandwidth[ti] * 1e9 / r.bytes_per_token;
    const double active =
        CountParameters(c).active - static_cast<double>(c.vocab_size * c.hidden_size);
    const double prefill_roofline = gemm[ti] * 1e9 / (2.0 * active);
    std::printf("| %s | %s | %d | %.0f MB | %.1f | %.1f | %.2f | %.0f%% |", r.preset.c_str(),
                r.dtype.c_str(), r.threads, r.bytes_per_token / 1e6, r.decode_tps[0],
                r.generate.mean_tps, r.generate.mean_tps / r.decode_tps[0],
                100.0 * r.decode_tps[0] / roofline_tps);
    for (size_t i = 1; i < r.decode_tps.size(); ++i) std::printf(" %.1f |", r.decode_tps[i]);
    std::printf(" %.1f | %.0f%% |", r.prefill_tps, 100.0 * r.prefill_tps / prefill_roofline);
    if (sgemm[ti] > 0)
      std::printf(" %.2f× |\n", r.prefill_tps / (sgemm[ti] * 1e9 / (2.0 * active)));
    else
      std::printf(" (no OpenBLAS) |\n");
  }
  // Prefill at 3× the sgemm-bound rate means matrix math at 3× sgemm's GFLOP/s: possible only
  // where that stays below the FMA peak (wider vectors or matrix tiles raise the peak).
  std::printf("\n| threads | 3× OpenBLAS sgemm GFLOP/s | FMA peak GFLOP/s | 3× sgemm / peak |\n");
  std::printf("|---|---|---|---|\n");
  for (size_t i = 0; i < thread_counts.size(); ++i) {
    if (sgemm[i] <= 0 || peak[i] <= 0) continue;
    std::printf("| %d | %.1f | %.1f | %.2f |\n", thread_counts[i], 3 * sgemm[i], peak[i],
                3 * sgemm[i] / peak[i]);
  }
  return 0;
}
