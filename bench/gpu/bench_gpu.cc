// GPU benchmark, every number measured in one run on one device:
//   - HBM bandwidth: a large device-to-device copy (bytes read + written);
//   - cuBLAS dense bf16 GEMM rate (8192³, and the expert problems as one dense GEMM);
//   - the grouped expert GEMM (gate/up with SiLU + down, medium-preset experts, top-6 of 64)
//     at batch 256 and 4096, against cuBLAS on the same FLOPs as one dense GEMM;
//   - the medium preset in bf16: prefill tokens/s, decode tokens/s at batch 1/32/256 (CUDA
//     graphs), and the fraction of HBM bandwidth batch-1 decode reaches (weight bytes a decode
//     step must read × tokens/s).
// A markdown table comes last.
//
//   dsmoe_bench_gpu [--dir /tmp/dsmoe-bench-gpu] [--device 0] [--steps 20]
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/model/cuda/cuda_model_runner.h"
#include "core/model/cuda/step_profiler.h"
#include "core/model/make_model.h"
#include "core/model/model_facts.h"
#include "core/ops/cuda/cublas_gemm.h"
#include "core/ops/cuda/cuda_ops.h"
#include "core/ops/cuda/cuda_status.h"
#include "core/tensor/dtype.h"

namespace {

using namespace dsmoe;

#define CHECK_OK(expr)                                                                           \
  do {                                                                                           \
    const absl::Status check_status_ = (expr);                                                   \
    if (!check_status_.ok()) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, check_status_.ToString().c_str()); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)
#define CHECK_CUDA(expr) CHECK_OK(::dsmoe::cuda::CudaStatus((expr), #expr))

template <class T>
T* DeviceAlloc(size_t n) {
  T* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, n * sizeof(T)));
  return p;
}

// Fills n bf16 values with uniform [-scale, scale) (never zeros: zeros run faster than data).
void FillRandomBf16(uint16_t* d, size_t n, float scale, uint64_t seed) {
  const size_t chunk = std::min<size_t>(n, size_t{1} << 24);
  std::vector<uint16_t> host(chunk);
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> dist(-scale, scale);
  for (uint16_t& v : host) v = F32ToBf16(dist(rng));
  for (size_t off = 0; off < n; off += chunk) {
    CHECK_CUDA(
        cudaMemcpy(d + off, host.data(), std::min(chunk, n - off) * 2, cudaMemcpyHostToDevice));
  }
}

// Median milliseconds of `reps` timed runs of fn (after `warm` untimed ones).
template <class Fn>
double MedianMs(Fn fn, int warm = 3, int reps = 15) {
  for (int i = 0; i < warm; ++i) fn();
  cudaEvent_t a, b;
  CHECK_CUDA(cudaEventCreate(&a));
  CHECK_CUDA(cudaEventCreate(&b));
  std::vector<double> ms;
  for (int i = 0; i < reps; ++i) {
    CHECK_CUDA(cudaEventRecord(a));
    fn();
    CHECK_CUDA(cudaEventRecord(b));
    CHECK_CUDA(cudaEventSynchronize(b));
    float t = 0;
    CHECK_CUDA(cudaEventElapsedTime(&t, a, b));
    ms.push_back(t);
  }
  CHECK_CUDA(cudaEventDestroy(a));
  CHECK_CUDA(cudaEventDestroy(b));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

double HbmBandwidth() {
  const size_t bytes = size_t{2} << 30;
  char* src = DeviceAlloc<char>(bytes);
  char* dst = DeviceAlloc<char>(bytes);
  CHECK_CUDA(cudaMemset(src, 1, bytes));
  const double ms =
      MedianMs([&] { CHECK_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice)); });
  CHECK_CUDA(cudaFree(src));
  CHECK_CUDA(cudaFree(dst));
  return 2.0 * static_cast<double>(bytes) / (ms * 1e-3);
}

// TFLOP/s of y[M, N] = x[M, K]·W[N, K]ᵀ through cuBLAS (bf16 in, fp32 accumulate and out).
double DenseGemmTflops(cuda::CublasGemm& gemm, int64_t M, int64_t N, int64_t K) {
  uint16_t* x = DeviceAlloc<uint16_t>(M * K);
  uint16_t* w = DeviceAlloc<uint16_t>(N * K);
  float* y = DeviceAlloc<float>(M * N);
  FillRandomBf16(x, M * K, 1.0f, 1);
  FillRandomBf16(w, N * K, 0.05f, 2);
  const double ms = MedianMs([&] { CHECK_OK(gemm.Bf16(x, M, w, N, K, 0.0f, y, nullptr)); });
  CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(w));
  CHECK_CUDA(cudaFree(y));
  return 2.0 * M * N * K / (ms * 1e-3) / 1e12;
}

// Microseconds of one small-batch projection y[T, N] = x[T, K]·Wᵀ: cuBLAS and the GEMV kernel.
std::pair<double, double> SmallBatchProjectionUs(cuda::CublasGemm& gemm, int64_t T, int64_t N,
                                                 int64_t K) {
  uint16_t* x = DeviceAlloc<uint16_t>(T * K);
  uint16_t* w = DeviceAlloc<uint16_t>(N * K);
  float* y = DeviceAlloc<float>(T * N);
  FillRandomBf16(x, T * K, 1.0f, 11);
  FillRandomBf16(w, N * K, 0.05f, 12);
  const double cublas_ms =
      MedianMs([&] { CHECK_OK(gemm.Bf16(x, T, w, N, K, 0.0f, y, nullptr)); }, 3, 31);
  const double gemv_ms =
      MedianMs([&] { CHECK_CUDA(cuda::LaunchGemvBf16(x, T, w, N, K, false, y, nullptr)); }, 3, 31);
  CHECK_CUDA(cudaFree(x));
  CHECK_CUDA(cudaFree(w));
  CHECK_CUDA(cudaFree(y));
  return {cublas_ms * 1e3, gemv_ms * 1e3};
}

struct GroupedResult {
  int64_t tokens;
  double grouped_tflops, dense_tflops, grouped_us;
  double gemv_us;            // the same problem on the GEMV-shaped kernel
  double roofline_fraction;  // bytes of the experts chosen / time, over the HBM bandwidth
};

// The routed experts of one medium-preset MoE layer (E = 64, H = 1024, W = 704, top-6), random
// distinct experts per token.
GroupedResult GroupedExperts(cuda::CublasGemm& gemm, int64_t T, double hbm) {
  const int E = 64, H = 1024, W = 704, k = 6;
  std::vector<const uint16_t*> gu_ptrs(E), down_ptrs(E);
  std::vector<int32_t> widths(E, W);
  uint16_t* weights = DeviceAlloc<uint16_t>(static_cast<size_t>(E) * 3 * W * H);
  FillRandomBf16(weights, static_cast<size_t>(E) * 3 * W * H, 0.03f, 3);
  for (int e = 0; e < E; ++e) {
    gu_ptrs[e] = weights + static_cast<size_t>(e) * 3 * W * H;
    down_ptrs[e] = gu_ptrs[e] + static_cast<size_t>(2) * W * H;
  }
  const uint16_t** d_gu = DeviceAlloc<const uint16_t*>(E);
  const uint16_t** d_down = DeviceAlloc<const uint16_t*>(E);
  int32_t* d_width = DeviceAlloc<int32_t>(E);
  CHECK_CUDA(cudaMemcpy(d_gu, gu_ptrs.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_down, down_ptrs.data(), E * sizeof(void*), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_width, widths.data(), E * sizeof(int32_t), cudaMemcpyHostToDevice));
  cuda::GroupedWeights gw{d_gu, d_down, d_width, E, W, H};

  std::vector<int32_t> experts(T * k);
  std::mt19937 rng(5);
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    std::copy_n(perm.begin(), k, experts.begin() + t * k);
  }
  int32_t* d_experts = DeviceAlloc<int32_t>(T * k);
  CHECK_CUDA(
      cudaMemcpy(d_experts, experts.data(), T * k * sizeof(int32_t), cudaMemcpyHostToDevice));
  const int64_t tiles = cuda::MaxGroupedTiles(T, k, E);
  cuda::GroupedPlan plan{
      DeviceAlloc<int32_t>(E + 1), DeviceAlloc<int32_t>(E),     DeviceAlloc<int32_t>(T * (k + 1)),
      DeviceAlloc<int32_t>(T * k), DeviceAlloc<int32_t>(tiles), DeviceAlloc<int32_t>(tiles),
      DeviceAlloc<int32_t>(1)};
  uint16_t* x = DeviceAlloc<uint16_t>(T * H);
  FillRandomBf16(x, T * H, 1.0f, 6);
  uint16_t* act = DeviceAlloc<uint16_t>(T * k * W);
  float* out = DeviceAlloc<float>(T * k * H);
  CHECK_CUDA(cuda::LaunchBuildGroupedPlan(d_experts, T, k, E, true, false, plan, nullptr));
  auto grouped_ms = [&](cuda::GroupedAlgo algo) {
    return MedianMs([&] {
      CHECK_CUDA(cuda::LaunchGroupedGateUp(x, T, k, plan, gw, act, nullptr, algo));
      CHECK_CUDA(cuda::LaunchGroupedDown(act, T, k, plan, gw, out, nullptr, algo));
    });
  };
  const double ms = grouped_ms(cuda::GroupedAlgo::kTensorCore);
  const double gemv_ms = grouped_ms(cuda::GroupedAlgo::kGemv);
  const double flops = 2.0 * T * k * (2.0 * W * H + 1.0 * W * H);
  // The weights that must be read at least once: every chosen expert's three matrices.
  std::vector<bool> chosen(E, false);
  for (int32_t e : experts) chosen[e] = true;
  const double bytes = 2.0 * 3 * W * H * std::count(chosen.begin(), chosen.end(), true);
  const double best_ms = std::min(ms, gemv_ms);
  // The same FLOPs as dense GEMMs: all T·k rows against one expert's matrices.
  uint16_t* xs = DeviceAlloc<uint16_t>(T * k * H);
  FillRandomBf16(xs, T * k * H, 1.0f, 7);
  float* gu_out = DeviceAlloc<float>(T * k * 2 * W);
  const double dense_ms = MedianMs([&] {
    CHECK_OK(gemm.Bf16(xs, T * k, gu_ptrs[0], 2 * W, H, 0.0f, gu_out, nullptr));
    CHECK_OK(gemm.Bf16(act, T * k, down_ptrs[0], H, W, 0.0f, out, nullptr));
  });
  for (void* p : {static_cast<void*>(weights), static_cast<void*>(d_gu), static_cast<void*>(d_down),
                  static_cast<void*>(d_width), static_cast<void*>(d_experts), static_cast<void*>(x),
                  static_cast<void*>(act), static_cast<void*>(out), static_cast<void*>(xs),
                  static_cast<void*>(gu_out), static_cast<void*>(plan.group_offset),
                  static_cast<void*>(plan.cursor), static_cast<void*>(plan.row_token),
                  static_cast<void*>(plan.assign_row), static_cast<void*>(plan.tile_group),
                  static_cast<void*>(plan.tile_row), static_cast<void*>(plan.num_tiles)}) {
    CHECK_CUDA(cudaFree(p));
  }
  return {T,
          flops / (ms * 1e-3) / 1e12,
          flops / (dense_ms * 1e-3) / 1e12,
          ms * 1e3,
          gemv_ms * 1e3,
          bytes / (best_ms * 1e-3) / hbm};
}

// Bytes of weights one decode step must read (core/model/model_facts.h): bf16 matrices, the
// routers in fp32 on the GPU.
double DecodeBytesPerToken(const ModelConfig& c) {
  const DecodeWeights w = CountDecodeWeights(c);
  return 2.0 * static_cast<double>(w.matrices) + 4.0 * static_cast<double>(w.routers);
}

double Seconds(std::chrono::steady_clock::time_point a) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/tmp/dsmoe-bench-gpu";
  int device = 0, steps = 20;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--dir")
      dir = value;
    else if (flag == "--device")
      device = std::stoi(value);
    else if (flag == "--steps")
      steps = std::stoi(value);
    else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  if (const absl::Status s = cuda::CheckCudaDevice(device); !s.ok()) {
    std::fprintf(stderr, "%s\n", std::string(s.message()).c_str());
    return 1;
  }
  CHECK_CUDA(cudaSetDevice(device));
  cudaDeviceProp prop{};
  CHECK_CUDA(cudaGetDeviceProperties(&prop, device));
  std::printf("device %d: %s, %d SMs, %.1f GiB\n", device, prop.name, prop.multiProcessorCount,
              static_cast<double>(prop.totalGlobalMem) / (1 << 30));
  std::fflush(stdout);

  auto gemm_or = cuda::CublasGemm::Create();
  CHECK_OK(gemm_or.status());
  cuda::CublasGemm& gemm = **gemm_or;
  const double hbm = HbmBandwidth();
  std::printf("HBM copy bandwidth: %.0f GB/s\n", hbm / 1e9);
  const double peak = DenseGemmTflops(gemm, 8192, 8192, 8192);
  std::printf("cuBLAS bf16 GEMM 8192^3: %.0f TFLOP/s\n", peak);
  std::fflush(stdout);
  std::vector<GroupedResult> grouped;
  for (int64_t T : {1, 4, 8, 16, 32, 64, 256, 4096}) {
    grouped.push_back(GroupedExperts(gemm, T, hbm));
    const GroupedResult& g = grouped.back();
    std::printf(
        "grouped experts T=%ld: tensor cores %.1f us (%.1f TFLOP/s), gemv %.1f us; dense cuBLAS "
        "same FLOPs %.1f TFLOP/s (%.0f%%); chosen-expert bytes at %.0f%% of HBM bandwidth\n",
        static_cast<long>(T), g.grouped_us, g.grouped_tflops, g.gemv_us, g.dense_tflops,
        100 * g.grouped_tflops / g.dense_tflops, 100 * g.roofline_fraction);
    std::fflush(stdout);
  }

  // Small-batch projections of the medium preset: q/k/v (3072 × 1024) and the LM head.
  struct ProjectionRow {
    int64_t T, N, K;
    double cublas_us, gemv_us;
  };
  std::vector<ProjectionRow> projections;
  for (auto [N, K] : {std::pair<int64_t, int64_t>{3072, 1024}, {32000, 1024}}) {
    for (int64_t T : {1, 4, 8, 16, 32}) {
      const auto [cublas_us, gemv_us] = SmallBatchProjectionUs(gemm, T, N, K);
      projections.push_back({T, N, K, cublas_us, gemv_us});
      std::printf("projection %ldx%ldx%ld: cuBLAS %.1f us, GEMV %.1f us\n", static_cast<long>(T),
                  static_cast<long>(N), static_cast<long>(K), cublas_us, gemv_us);
    }
  }
  std::fflush(stdout);

  // --- The medium preset, bf16 ---
  const ModelConfig config = *PresetConfig("medium");
  const std::string model_dir = dir + "/medium-bf16";
  if (!std::filesystem::exists(model_dir + "/config.json")) {
    std::printf("writing %s ...\n", model_dir.c_str());
    std::fflush(stdout);
    CHECK_OK(WriteRandomCheckpoint(config, {DType::kBF16, 1, 1}, model_dir));
  }
  auto weights = ModelWeights::Load(model_dir);
  CHECK_OK(weights.status());
  cuda::CudaRunnerOptions o;
  o.device = device;
  o.num_slots = 256;
  o.max_context = 512;
  o.max_batch_tokens = 256;
  auto t_create = std::chrono::steady_clock::now();
  auto runner_or = cuda::CudaModelRunner::Create(**weights, o);
  CHECK_OK(runner_or.status());
  cuda::CudaModelRunner& runner = **runner_or;
  std::printf("medium bf16: %.2f GB of weights on the GPU, uploaded in %.1f s\n",
              runner.weight_bytes() / 1e9, Seconds(t_create));
  const int64_t V = config.vocab_size;
  float* logits = nullptr;
  CHECK_CUDA(cudaMallocHost(&logits, 256 * V * sizeof(float)));
  auto release_all = [&] {
    for (int32_t s = 0; s < 256; ++s) runner.ReleaseSlot(s);
  };
  auto token = [](int64_t i) { return static_cast<int32_t>(2 + (i * 7919) % 30000); };

  // Prefill: chunks of 256 tokens, each from one sequence, logits of the last token only.
  auto prefill = [&](int32_t slot0, int num_seqs, int64_t len) {
    for (int s = 0; s < num_seqs; ++s) {
      for (int64_t p0 = 0; p0 < len; p0 += 256) {
        const int64_t n = std::min<int64_t>(256, len - p0);
        std::vector<int32_t> ids(n), slots(n, slot0 + s), pos(n);
        for (int64_t i = 0; i < n; ++i) {
          ids[i] = token(p0 + i + s);
          pos[i] = static_cast<int32_t>(p0 + i);
        }
        const std::vector<int32_t> last = {static_cast<int32_t>(n - 1)};
        CHECK_OK(runner.Forward({ids, slots, pos, last}, logits));
      }
    }
  };
  prefill(0, 2, 256);  // warm-up: cuBLAS heuristics, first-touch
  release_all();
  auto t0 = std::chrono::steady_clock::now();
  prefill(0, 8, 256);
  const double prefill_tps = 8 * 256 / Seconds(t0);
  release_all();
  std::printf("prefill: %.0f tokens/s (8 prompts of 256 tokens)\n", prefill_tps);
  std::fflush(stdout);

  // Decode at batch B: B sequences with 64-token prompts (prefilled 4 per 256-token chunk), then
  // `steps` timed steps of all B at once (each step's logits to pinned host memory).
  struct DecodeRow {
    int B;
    double tps, step_us;
  };
  std::vector<DecodeRow> decode;
  std::vector<double> decode_device_us;  // device time of a graph step (coarse profile)
  for (int B : {1, 32, 256}) {
    const int64_t prompt = 64;
    for (int s0 = 0; s0 < B; s0 += 4) {
      std::vector<int32_t> ids, slots, pos;
      for (int s = s0; s < std::min(B, s0 + 4); ++s) {
        for (int64_t p = 0; p < prompt; ++p) {
          ids.push_back(token(p + s));
          slots.push_back(s);
          pos.push_back(static_cast<int32_t>(p));
        }
      }
      CHECK_OK(runner.Forward({ids, slots, pos, {}}, logits));
    }
    std::vector<int32_t> ids(B), slots(B), pos(B, static_cast<int32_t>(prompt)), rows(B);
    std::iota(slots.begin(), slots.end(), 0);
    std::iota(rows.begin(), rows.end(), 0);
    auto step = [&] {
      for (int b = 0; b < B; ++b) ids[b] = token(pos[b] + b);
      CHECK_OK(runner.Forward({ids, slots, pos, rows}, logits));
      for (int32_t& p : pos) ++p;
    };
    for (int i = 0; i < 3; ++i) step();  // captures this batch size's graph
    auto t1 = std::chrono::steady_clock::now();
    for (int i = 0; i < steps; ++i) step();
    const double sec = Seconds(t1);
    decode.push_back({B, B * steps / sec, sec / steps * 1e6});
    std::printf("decode batch %d: %.0f tokens/s, %.0f us/step\n", B, decode.back().tps,
                decode.back().step_us);
    // Where the time goes: the device's share of a graph step (the rest of the wall time is the
    // host's), then phase by phase (no graph: kernels launched one by one, so the total exceeds
    // the graph step by the launch gaps).
    for (bool per_phase : {false, true}) {
      auto profiler = cuda::StepProfiler::Create(per_phase);
      CHECK_OK(profiler.status());
      runner.set_profiler(profiler->get());
      for (int i = 0; i < 5; ++i) step();
      runner.set_profiler(nullptr);
      const int n = (*profiler)->steps();
      double total = 0;
      for (const auto& [phase, us] : (*profiler)->totals_us()) total += us / n;
      std::printf("  %s profile of batch %d, us per step (total %.0f):",
                  per_phase ? "per-phase (no graph)" : "graph", B, total);
      for (const auto& [phase, us] : (*profiler)->totals_us()) {
        std::printf(" %s %.1f", phase.c_str(), us / n);
      }
      std::printf("\n");
      if (!per_phase) decode_device_us.push_back(total);
    }
    std::fflush(stdout);
    release_all();
  }
  const double bytes_per_token = DecodeBytesPerToken(config);
  const double bw_fraction = bytes_per_token * decode[0].tps / hbm;

  std::printf("\n| measurement | value | target |\n|---|---|---|\n");
  std::printf("| HBM copy bandwidth (D2D, read+write) | %.0f GB/s | |\n", hbm / 1e9);
  std::printf("| cuBLAS dense bf16 GEMM 8192^3 | %.0f TFLOP/s | |\n", peak);
  for (const GroupedResult& g : grouped) {
    if (g.tokens != 256 && g.tokens != 4096) continue;
    std::printf(
        "| grouped expert GEMM, batch %ld (64 experts, top-6, 1024x704) | %.1f TFLOP/s (%.0f us) | "
        "|\n",
        static_cast<long>(g.tokens), g.grouped_tflops, g.grouped_us);
    std::printf("| cuBLAS dense GEMM, same FLOPs, batch %ld | %.1f TFLOP/s | |\n",
                static_cast<long>(g.tokens), g.dense_tflops);
    std::printf("| grouped / dense, batch %ld | %.0f%% | %s |\n", static_cast<long>(g.tokens),
                100 * g.grouped_tflops / g.dense_tflops, g.tokens == 256 ? ">= 50%" : "");
    std::printf(
        "| grouped, batch %ld: chosen experts' bytes / time vs HBM bandwidth | %.0f%% | |\n",
        static_cast<long>(g.tokens), 100 * g.roofline_fraction);
  }
  for (const GroupedResult& g : grouped) {
    std::printf("| grouped experts, batch %ld: tensor-core / GEMV kernel | %.1f / %.1f us | |\n",
                static_cast<long>(g.tokens), g.grouped_us, g.gemv_us);
  }
  for (const ProjectionRow& p : projections) {
    std::printf("| projection %ldx%ldx%ld: cuBLAS / GEMV kernel | %.1f / %.1f us | |\n",
                static_cast<long>(p.T), static_cast<long>(p.N), static_cast<long>(p.K), p.cublas_us,
                p.gemv_us);
  }
  std::printf("| medium bf16 prefill | %.0f tok/s | |\n", prefill_tps);
  for (size_t i = 0; i < decode.size(); ++i) {
    const DecodeRow& d = decode[i];
    std::printf(
        "| medium bf16 decode, batch %d | %.0f tok/s (%.0f us/step, of which device %.0f us) | |\n",
        d.B, d.tps, d.step_us, decode_device_us[i]);
  }
  std::printf("| batch-1 decode: weights read/token | %.0f MB | |\n", bytes_per_token / 1e6);
  std::printf("| batch-1 decode: fraction of HBM bandwidth | %.0f%% (%.0f GB/s) | >= 60%% |\n",
              100 * bw_fraction, bytes_per_token * decode[0].tps / 1e9);
  CHECK_CUDA(cudaFreeHost(logits));
  return 0;
}
