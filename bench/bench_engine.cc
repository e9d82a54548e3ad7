// Prefill and decode throughput of the single-process engine on the small and medium presets,
// F32/BF16/F16 weights, 1..N threads, printed as one table measured in one run.
//
//   dsmoe_bench_engine [--presets small,medium] [--dtypes f32,bf16] [--threads 1,2]
//                      [--prompt 128] [--decode 64] [--dir /tmp/dsmoe-bench]
//
// "weights/token" is the bytes of weights a decode step must read (attention, dense and shared
// MLPs, router, the top-k routed experts of each MoE layer, the head, one embedding row); times
// decode tokens/s it gives the memory bandwidth the decode loop sustains.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <sstream>
#include <string>
#include <vector>

#include "core/model/generator.h"
#include "core/model/make_model.h"
#include "core/model/model_runner.h"
#include "core/model/weights.h"
#include "core/util/cpu_features.h"
#include "core/util/thread_pool.h"

namespace {

using namespace dsmoe;

std::vector<std::string> Split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  for (std::string item; std::getline(ss, item, ',');) out.push_back(item);
  return out;
}

double DecodeBytesPerToken(const ModelConfig& c, DType dtype) {
  const double H = c.hidden_size, hd = c.head_dim();
  double params = 0;
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    params += H * hd * (2 * c.num_attention_heads + 2 * c.num_key_value_heads);  // q, k, v, o
    if (c.IsMoeLayer(i)) {
      params += c.n_routed_experts * H;  // router
      params += 3 * H * (c.shared_intermediate_size() + c.num_experts_per_tok * c.moe_intermediate_size);
    } else {
      params += 3 * H * c.intermediate_size;
    }
  }
  params += c.vocab_size * H + H;  // head + one embedding row
  return params * static_cast<double>(DTypeSize(dtype));
}

struct Row {
  std::string preset, dtype;
  int threads;
  double prefill_tps, decode_tps, bytes_per_token;
};

}  // namespace

int main(int argc, char** argv) {
  std::string presets = "small,medium", dtypes = "f32,bf16", threads = "1,2",
              dir = "/tmp/dsmoe-bench";
  int64_t prompt_len = 128, decode_len = 64;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--presets") presets = value;
    else if (flag == "--dtypes") dtypes = value;
    else if (flag == "--threads") threads = value;
    else if (flag == "--dir") dir = value;
    else if (flag == "--prompt") prompt_len = std::stoll(value);
    else if (flag == "--decode") decode_len = std::stoll(value);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  std::printf("CPU kernels: %s\n", GetCpuFeatures().ToString().c_str());
  std::vector<Row> rows;
  for (const std::string& preset : Split(presets)) {
    for (const std::string& dtype_name : Split(dtypes)) {
      const DType dtype = dtype_name == "bf16" ? DType::kBF16 : dtype_name == "f16" ? DType::kF16 : DType::kF32;
      const std::string model_dir = dir + "/" + preset + "-" + dtype_name;
      auto config = PresetConfig(preset);
      if (!config.ok()) {
        std::fprintf(stderr, "%s\n", std::string(config.status().message()).c_str());
        return 1;
      }
      if (!std::filesystem::exists(model_dir + "/config.json")) {
        std::printf("writing %s ...\n", model_dir.c_str());
        std::fflush(stdout);
        if (auto s = WriteRandomCheckpoint(*config, {dtype, 1, 1}, model_dir); !s.ok()) {
          std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
          return 1;
        }
      }
      auto weights = ModelWeights::Load(model_dir);
      if (!weights.ok()) {
        std::fprintf(stderr, "%s\n", std::string(weights.status().message()).c_str());
        return 1;
      }
      for (const std::string& t : Split(threads)) {
        ThreadPool pool(std::stoi(t));
        RunnerOptions options;
        options.max_context = prompt_len + decode_len + 1;
        auto runner = ModelRunner::Create(**weights, pool, options);
        if (!runner.ok()) return 1;
        GenerateRequest request;
        for (int64_t i = 0; i < prompt_len; ++i) request.prompt.push_back(static_cast<int32_t>(2 + (i * 7919) % 500));
        request.max_tokens = decode_len + 1;
        request.ignore_eos = true;
        // One warm-up pass touches every page of the mapped weights.
        GenerateRequest warm = request;
        warm.max_tokens = 2;
        (void)Generate(**runner, (*weights)->generation_config(), warm);
        auto result = Generate(**runner, (*weights)->generation_config(), request);
        if (!result.ok()) return 1;
        rows.push_back({preset, dtype_name, pool.num_threads(), prompt_len / result->prefill_seconds,
                        decode_len / result->decode_seconds, DecodeBytesPerToken(*config, dtype)});
        const Row& r = rows.back();
        std::printf("%-7s %-5s threads=%d  prefill %8.1f tok/s  decode %7.2f tok/s  weights/token %7.1f MB  %.1f GB/s\n",
                    r.preset.c_str(), r.dtype.c_str(), r.threads, r.prefill_tps, r.decode_tps,
                    r.bytes_per_token / 1e6, r.bytes_per_token * r.decode_tps / 1e9);
        std::fflush(stdout);
      }
    }
  }
  std::printf("\n| preset | dtype | threads | prefill tok/s | decode tok/s | weights read/token | decode GB/s |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  for (const Row& r : rows) {
    std::printf("| %s | %s | %d | %.1f | %.2f | %.1f MB | %.1f |\n", r.preset.c_str(), r.dtype.c_str(),
                r.threads, r.prefill_tps, r.decode_tps, r.bytes_per_token / 1e6,
                r.bytes_per_token * r.decode_tps / 1e9);
  }
  return 0;
}
