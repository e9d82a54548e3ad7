// The AMX BF16 GEMM against the kernel tables on DeepSeekMoE 16B's prefill shapes, in one run:
// a chunk of 512 prompt tokens through BF16 weights [N, K] — the attention and shared-expert
// projections (K = 2048 → N = 2048, the fused shared-expert gate/up K = 2048 → N = 10944) and
// one routed expert (gate or up: K = 2048 → N = 1408, down: K = 1408 → N = 2048).
//
// AMX runs at two precisions (AmxPrecision): "exact" splits each fp32 activation into three
// BF16 parts (the fp32 product, three times the tile work), "fast" rounds it to BF16 (2^-8).
// Rows are split over the threads as ops::Linear does for T >= 16 (RowChunkSize(N, threads, 8,
// 8): about 8 chunks per thread, each a multiple of 8 rows), so each kernel call sees the row
// ranges it sees in the engine. "1 chunk/thread" gives each thread one contiguous range
// instead: AMX converts the activations to BF16 once per call, so fewer calls cost less.
// "x packed once" keeps the engine's chunks but packs x once (AmxPackActivations, the threads
// taking slices of tokens) for every chunk to read (AmxMatMulRowsPacked).
//
// Q8_0 runs the same shapes (exact mode: q in the tiles, each block scaled by its d in fp32).
//
// "weight tiles" packs x transposed for the other orientation (AmxLayout::kWeightTiles: the
// weight rows read in place as A tiles, nothing repacked per call); "ops::Linear, amx table" is
// what the model runs (x prepared once, the layout chosen by T).
//
//   dsmoe_bench_amx [--threads 1,2] [--dtypes bf16,q8] [--tokens 16,48,512] [--reps 5]
//                   [--shapes gateup,down,shared,attn,mgateup,mdown] [--only-exact 1]
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_args.h"
#include "core/model/quantize.h"
#include "core/ops/cpu/amx_gemm.h"
#include "core/ops/kernels.h"
#include "core/ops/ops.h"
#include "core/tensor/dtype.h"
#include "core/util/cpu_features.h"
#include "core/util/thread_pool.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;
using MatMulFn = void (*)(const float*, int64_t, const MatrixView&, int64_t, int64_t, float*,
                          int64_t);

struct Shape {
  const char* key;  // --shapes name
  const char* what;
  int64_t K, N;
};

// Wall-clock and process CPU seconds of one run of fn(). On a shared machine the CPU time is
// the steadier figure: a thread that other processes preempt loses wall time, not CPU time.
struct Timing {
  double wall, cpu;
};
double ProcessCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}
template <class Fn>
Timing Measure(Fn fn) {
  const auto t0 = Clock::now();
  const double c0 = ProcessCpuSeconds();
  fn();
  return {std::chrono::duration<double>(Clock::now() - t0).count(), ProcessCpuSeconds() - c0};
}

// y = x · Wᵀ over the pool, `chunk` rows per task, as ops::Linear runs it.
void RunSplit(ThreadPool& pool, MatMulFn fn, const float* x, int64_t T, const MatrixView& W,
              int64_t chunk, float* y) {
  const int64_t N = W.rows, tasks = (N + chunk - 1) / chunk;
  pool.ParallelFor(tasks, [&](int64_t task, int) {
    const int64_t r0 = task * chunk, r1 = std::min(N, r0 + chunk);
    fn(x, T, W, r0, r1, y, N);
  });
}

void AmxExact(const float* x, int64_t T, const MatrixView& W, int64_t r0, int64_t r1, float* y,
              int64_t ldy) {
  ops::AmxMatMulRows(x, T, W, r0, r1, y, ldy, ops::AmxPrecision::kExact);
}
void AmxFast(const float* x, int64_t T, const MatrixView& W, int64_t r0, int64_t r1, float* y,
             int64_t ldy) {
  ops::AmxMatMulRows(x, T, W, r0, r1, y, ldy, ops::AmxPrecision::kBf16);
}

// The same with x packed to BF16 tiles once, the threads packing slices of 16-token tiles,
// then every row task reading the one packed copy (AmxMatMulRowsPacked).
void RunPackedSplit(ThreadPool& pool, ops::AmxPrecision precision, ops::AmxLayout layout,
                    const float* x, int64_t T, const MatrixView& W, int64_t chunk, uint16_t* packed,
                    float* y) {
  const int64_t K = W.cols, N = W.rows, tiles = (T + 15) / 16;
  const int64_t slice = (tiles + pool.num_threads() - 1) / pool.num_threads() * 16;
  pool.ParallelFor((T + slice - 1) / slice, [&](int64_t task, int) {
    const int64_t t0 = task * slice, t1 = std::min(T, t0 + slice);
    ops::AmxPackActivations(x + t0 * K, t1 - t0, K,
                            packed + ops::AmxPackedActivationsSize(t0, K, precision), precision,
                            layout);
  });
  const int64_t tasks = (N + chunk - 1) / chunk;
  pool.ParallelFor(tasks, [&](int64_t task, int) {
    const int64_t r0 = task * chunk, r1 = std::min(N, r0 + chunk);
    ops::AmxMatMulRowsPacked(packed, T, W, r0, r1, y, N, precision, layout);
  });
}

}  // namespace

int main(int argc, char** argv) {
  std::string threads_arg = "1,2", dtypes_arg = "bf16,q8", tokens_arg = "512", shapes_arg = "all";
  int reps = 5;
  bool only_exact = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--threads") {
      threads_arg = argv[i + 1];
    } else if (flag == "--dtypes") {
      dtypes_arg = argv[i + 1];
    } else if (flag == "--tokens") {
      tokens_arg = argv[i + 1];
    } else if (flag == "--shapes") {
      shapes_arg = argv[i + 1];
    } else if (flag == "--only-exact") {
      only_exact = std::string(argv[i + 1]) == "1";
    } else if (flag == "--reps") {
      reps = std::stoi(argv[i + 1]);
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  const ops::KernelTable& best = ops::Kernels();
  const ops::KernelTable* avx2 = GetCpuFeatures().HasAvx2Kernels() ? ops::Avx2Kernels() : nullptr;
  const bool amx = ops::AmxUsable();
  std::printf("CPU: %s; AMX %s; Kernels() picks \"%s\"\n", GetCpuFeatures().ToString().c_str(),
              amx ? "usable" : "not usable", best.name);
  std::printf("T = %s tokens, best of %d rounds after a warm-up round\n\n", tokens_arg.c_str(),
              reps);
  if (!amx) std::printf("(AMX rows skipped: AMX is not usable on this machine)\n\n");

  const Shape all_shapes[] = {{"gateup", "expert gate/up", 2048, 1408},
                              {"down", "expert down", 1408, 2048},
                              {"shared", "shared experts gate/up", 2048, 10944},
                              {"attn", "attention projection", 2048, 2048},
                              // The medium preset of make-model / bench_engine (not in "all").
                              {"mgateup", "medium expert gate/up", 1024, 704},
                              {"mdown", "medium expert down", 704, 1024}};
  std::vector<Shape> shapes;
  for (const Shape& s : all_shapes) {
    for (const std::string& name : bench::SplitList(shapes_arg))
      if ((name == "all" && s.key[0] != 'm') || name == s.key) shapes.push_back(s);
  }
  std::printf(
      "| dtype | shape | K → N | T | threads | kernel | ms | GFLOP/s | GFLOP per CPU-s | per "
      "CPU-s vs avx2 |\n");
  std::printf("|---|---|---|---|---|---|---|---|---|---|\n");
  for (const std::string& dtype : bench::SplitList(dtypes_arg)) {
    const bool q8 = dtype == "q8";
    for (const std::string& th : bench::SplitList(threads_arg)) {
      const int threads = std::stoi(th);
      ThreadPool pool(threads);
      for (const Shape& s : shapes) {
        for (const std::string& tokens : bench::SplitList(tokens_arg)) {
          const int64_t T = std::stoll(tokens);
          std::mt19937 rng(11);
          std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
          std::vector<float> wf(s.N * s.K);
          for (float& v : wf) v = dist(rng) * 0.05f;
          std::vector<uint16_t> w(s.N * s.K), scales(s.N * s.K / kQ8Block);
          std::vector<int8_t> q(q8 ? s.N * s.K : 0);
          if (q8) {
            for (int64_t r = 0; r < s.N; ++r)
              QuantizeRowQ8(wf.data() + r * s.K, s.K, q.data() + r * s.K,
                            scales.data() + r * (s.K / kQ8Block));
          } else {
            for (int64_t i = 0; i < s.N * s.K; ++i) w[i] = F32ToBf16(wf[i]);
          }
          std::vector<float> x(T * s.K), y(T * s.N);
          for (float& v : x) v = dist(rng);
          const MatrixView W = q8 ? MatrixView{DType::kQ8_0, s.N, s.K, q.data(), scales.data()}
                                  : MatrixView{DType::kBF16, s.N, s.K, w.data()};
          const int64_t chunk = ops::RowChunkSize(s.N, threads, 8, 8);
          const int64_t one_chunk = ops::RowChunkSize(s.N, threads, 16, 1);
          const double flops = 2.0 * T * s.N * s.K;

          // Every variant once per round, `reps` rounds after a warm-up one, best time each: on a
          // shared machine a burst of load then slows one round of all, not all runs of one.
          struct Row {
            std::string name;
            std::function<void()> run;
            double secs = 1e30, cpu = 1e30;
          };
          std::vector<Row> rows;
          auto split = [&](const std::string& name, MatMulFn fn, int64_t c) {
            rows.push_back({name, [&, fn, c] { RunSplit(pool, fn, x.data(), T, W, c, y.data()); }});
          };
          const bool exact = amx && ops::AmxSupports(W.dtype, ops::AmxPrecision::kExact);
          std::vector<uint16_t> packed(
              amx ? ops::AmxPackedActivationsSize(T, s.K, ops::AmxPrecision::kExact) : 0);
          auto packed_once = [&](const std::string& name, ops::AmxPrecision precision,
                                 ops::AmxLayout layout) {
            rows.push_back({name, [&, precision, layout] {
                              RunPackedSplit(pool, precision, layout, x.data(), T, W, chunk,
                                             packed.data(), y.data());
                            }});
          };
          if (exact) {
            split("AMX exact", AmxExact, chunk);
            if (!only_exact) split("AMX exact, 1 chunk/thread", AmxExact, one_chunk);
            packed_once("AMX exact, x packed once", ops::AmxPrecision::kExact,
                        ops::AmxLayout::kTokenTiles);
            packed_once("AMX exact, x packed once, weight tiles", ops::AmxPrecision::kExact,
                        ops::AmxLayout::kWeightTiles);
            // What the model runs: ops::Linear with the amx table (prepared x, its choice of
            // layout by T).
            rows.push_back({"ops::Linear, amx table", [&] {
                              ops::Linear(pool, *ops::Avx512AmxKernels(), x.data(), T, W, nullptr,
                                          y.data());
                            }});
          }
          if (amx && !only_exact) {
            split("AMX fast", AmxFast, chunk);
            split("AMX fast, 1 chunk/thread", AmxFast, one_chunk);
            packed_once("AMX fast, x packed once", ops::AmxPrecision::kBf16,
                        ops::AmxLayout::kTokenTiles);
          }
          // The baseline of the last column: the AVX2 kernel, fp32 products like AMX exact.
          int64_t baseline = -1;
          if (avx2 != nullptr) {
            baseline = static_cast<int64_t>(rows.size());
            split("avx2", avx2->matmul_rows, chunk);
          }
          if (avx2 != &best)
            split(std::string("Kernels() = ") + best.name, best.matmul_rows, chunk);
          for (int round = 0; round <= reps; ++round) {
            for (Row& r : rows) {
              const Timing m = Measure(r.run);
              if (round > 0) {
                r.secs = std::min(r.secs, m.wall);
                r.cpu = std::min(r.cpu, m.cpu);
              }
            }
          }
          const double baseline_cpu = baseline >= 0 ? rows[baseline].cpu : 0;
          for (const Row& r : rows) {
            std::printf("| %s | %s | %lld → %lld | %lld | %d | %s | %.2f | %.1f | %.1f | ",
                        dtype.c_str(), s.what, (long long)s.K, (long long)s.N, (long long)T,
                        threads, r.name.c_str(), r.secs * 1e3, flops / r.secs / 1e9,
                        flops / r.cpu / 1e9);
            if (baseline >= 0)
              std::printf("%.2fx |\n", baseline_cpu / r.cpu);
            else
              std::printf("- |\n");
          }
        }
      }
    }
  }
  std::printf(
      "\nGFLOP per CPU-s: the work over the process's CPU time (best round), i.e. the rate per "
      "busy\n"
      "core; steadier than GFLOP/s where other processes share the cores. per CPU-s vs avx2: the\n"
      "avx2 kernel's CPU time over this one's; >1 means faster. AMX exact and avx2 both give the\n"
      "fp32 product; AMX fast rounds the activations to BF16.\n");
  return 0;
}
