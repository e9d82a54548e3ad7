// The matrix kernels alone, on the shapes the medium preset runs, side by side with OpenBLAS
// sgemm on the same machine in the same run (one thread):
//   - matmul_rows over a layer's worth of expert matrices (64 × [704, 1024]) for T tokens each,
//     weights streamed from memory as in the model: GFLOP/s and weight GB/s per dtype and T;
//   - a projection [3072, 1024] at prefill sizes (T = 64 … 256);
//   - OpenBLAS sgemm (fp32, row-major x · Wᵀ), the compute ceiling prefill is judged by;
//   - every vectorised table this CPU runs (avx2, avx512, avx512bf16) side by side on the
//   DeepSeekMoE 16B
//     shapes, decode (T = 1) and a 512-token prefill, BF16 and Q8_0.
// The first sections use the table Kernels() chose (DSMOE_KERNELS=reference|avx2|avx512|
// avx512bf16 forces one); the header names it and the CPU's features.
//
//   dsmoe_bench_kernels [--tokens 1,2,4,8,16,24,32,48,64,128,256] [--dtypes f32,bf16,q8]
//                       [--only-16b 1]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench/bench_args.h"
#include "bench/machine_probe.h"
#include "core/ops/kernels.h"
#include "core/tensor/dtype.h"
#include "core/util/cpu_features.h"
#include "core/util/huge_pages.h"

namespace {

using namespace dsmoe;
using Clock = std::chrono::steady_clock;

// `count` random matrices [rows, cols] of one dtype in one buffer (Q8_0 with its scales).
struct MatrixSet {
  DType dtype;
  int64_t rows, cols, count;
  std::unique_ptr<HugePageBuffer> buffer;  // huge pages, as the engine keeps its weights
  uint8_t* data;
  std::vector<uint16_t> scales;

  MatrixSet(DType d, int64_t r, int64_t c, int64_t n) : dtype(d), rows(r), cols(c), count(n) {
    const int64_t elems = r * c * n;
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
    buffer = *HugePageBuffer::Allocate(elems * (d == DType::kQ8_0 ? 1 : DTypeSize(d)));
    data = reinterpret_cast<uint8_t*>(buffer->data());
    if (d == DType::kQ8_0) {
      for (int64_t i = 0; i < elems; ++i)
        data[i] = static_cast<uint8_t>(static_cast<int8_t>(dist(rng) * 127));
      scales.resize(elems / kQ8Block, F32ToF16(0.01f));
      return;
    }
    for (int64_t i = 0; i < elems; ++i) {
      const float v = dist(rng) * 0.05f;
      if (d == DType::kF32) reinterpret_cast<float*>(data)[i] = v;
      if (d == DType::kBF16) reinterpret_cast<uint16_t*>(data)[i] = F32ToBf16(v);
      if (d == DType::kF16) reinterpret_cast<uint16_t*>(data)[i] = F32ToF16(v);
    }
  }
  MatrixView At(int64_t i) const {
    const size_t values = static_cast<size_t>(rows * cols);
    return {dtype, rows, cols, data + i * values * (dtype == DType::kQ8_0 ? 1 : DTypeSize(dtype)),
            dtype == DType::kQ8_0 ? scales.data() + i * values / kQ8Block : nullptr};
  }
  double BytesPerMatrix() const {
    return static_cast<double>(rows * cols) *
           (dtype == DType::kQ8_0 ? (kQ8Block + 2.0) / kQ8Block : DTypeSize(dtype));
  }
};

// Best of `reps` timings of fn(), in seconds.
template <class Fn>
double BestSeconds(int reps, Fn fn) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

// This thread's CPU time, in seconds: on a shared machine it leaves out the time the thread
// waited for a core, so it is steadier than the wall clock (not immune: a busy sibling
// hyperthread still slows it).
double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// The 16B model's matrices (hidden size 2048) run by each fast table in the same run, the
// tables taking turns round by round so that a change in the machine's load hits them alike:
// T = 1 over enough copies (~256 MB) that the weights come from memory, as in decode; T = 512
// over one copy, as a prompt chunk does. Best of the rounds, wall clock and CPU time.
void CompareTablesOn16BShapes() {
  struct Shape {
    const char* name;
    int64_t rows, cols;
  };
  const Shape shapes[] = {{"expert up/gate 2048→1408", 1408, 2048},
                          {"dense MLP 2048→10944", 10944, 2048},
                          {"attention 2048→2048", 2048, 2048}};
  std::vector<const ops::KernelTable*> tables;
  std::string header, rule;
  for (const char* name : {"avx2", "avx512", "amx", "avx512bf16"}) {
    const ops::KernelTable* t = ops::KernelsNamed(name);
    if (t == nullptr) {
      std::printf("(%s: not on this CPU)\n", name);
      continue;
    }
    header += std::string(" ") + name + " GB/s | " + name + " GFLOP/s | " + name + " GFLOP/CPU-s |";
    rule += "---|---|---|";
    if (!tables.empty()) {  // speed against the first table, in the same run, by CPU time
      header += std::string(" ") + name + " / " + tables.front()->name + " |";
      rule += "---|";
    }
    tables.push_back(t);
  }
  if (tables.empty()) return;
  std::printf(
      "\nDeepSeekMoE 16B shapes, each table in the same run (one thread; T = 1: weights "
      "from memory; ratios by CPU time):\n\n");
  std::printf("| matrix | dtype | T |%s\n|---|---|---|%s\n", header.c_str(), rule.c_str());
  for (const Shape& shape : shapes) {
    for (DType dtype : {DType::kBF16, DType::kQ8_0}) {
      for (int64_t T : {1, 512}) {
        const double bytes = static_cast<double>(shape.rows * shape.cols) *
                             (dtype == DType::kQ8_0 ? (kQ8Block + 2.0) / kQ8Block : 2.0);
        const int64_t copies =
            T == 1 ? std::max<int64_t>(1, static_cast<int64_t>((256 << 20) / bytes)) : 1;
        const MatrixSet set(dtype, shape.rows, shape.cols, copies);
        std::vector<float> x(T * shape.cols, 0.5f), y(T * shape.rows);
        std::vector<double> wall(tables.size(), 1e30), cpu(tables.size(), 1e30);
        for (int round = 0; round < (T == 1 ? 5 : 3); ++round) {
          for (size_t i = 0; i < tables.size(); ++i) {
            const auto t0 = Clock::now();
            const double c0 = ThreadCpuSeconds();
            for (int64_t c = 0; c < copies; ++c)
              tables[i]->matmul_rows(x.data(), T, set.At(c), 0, shape.rows, y.data(), shape.rows);
            cpu[i] = std::min(cpu[i], (ThreadCpuSeconds() - c0) / copies);
            wall[i] = std::min(wall[i],
                               std::chrono::duration<double>(Clock::now() - t0).count() / copies);
          }
        }
        const double flops = 2.0 * T * shape.rows * shape.cols;
        std::printf("| %s | %s | %lld |", shape.name, std::string(DTypeName(dtype)).c_str(),
                    (long long)T);
        for (size_t i = 0; i < tables.size(); ++i) {
          std::printf(" %.1f | %.1f | %.1f |", bytes / wall[i] / 1e9, flops / wall[i] / 1e9,
                      flops / cpu[i] / 1e9);
          if (i > 0) std::printf(" %.2fx |", cpu[0] / cpu[i]);
        }
        std::printf("\n");
        std::fflush(stdout);
      }
    }
  }
}

DType ParseDType(const std::string& name) {
  if (name == "bf16") return DType::kBF16;
  if (name == "f16") return DType::kF16;
  if (name == "q8") return DType::kQ8_0;
  return DType::kF32;
}

}  // namespace

int main(int argc, char** argv) {
  std::string tokens_arg = "1,2,4,8,16,24,32,48,64,128,256", dtypes_arg = "f32,bf16,q8";
  bool only_16b = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--tokens") {
      tokens_arg = argv[i + 1];
    } else if (flag == "--dtypes") {
      dtypes_arg = argv[i + 1];
    } else if (flag == "--only-16b") {
      only_16b = std::string(argv[i + 1]) == "1";
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }
  std::vector<int64_t> token_counts;
  for (const auto& t : bench::SplitList(tokens_arg)) token_counts.push_back(std::stoll(t));
  const ops::KernelTable& k = ops::Kernels();
  std::printf("kernels: %s table; CPU: %s; one thread\n\n", k.name,
              GetCpuFeatures().ToString().c_str());
  if (only_16b) {
    CompareTablesOn16BShapes();
    return 0;
  }

  const double blas_gflops = bench::SgemmRate(1);
  if (blas_gflops > 0)
    std::printf("OpenBLAS sgemm 256x1024x1024: %.1f GFLOP/s\n\n", blas_gflops);
  else
    std::printf("OpenBLAS sgemm: not built in (libopenblas-dev missing)\n\n");

  // A layer's routed experts: each matrix once per pass, so the weights come from memory.
  std::printf(
      "Expert matrices 64 × [704, 1024], each run over T tokens (weights from memory):\n\n");
  std::printf("| dtype | T | GFLOP/s | weight GB/s | %% of sgemm |\n|---|---|---|---|---|\n");
  for (const std::string& dname : bench::SplitList(dtypes_arg)) {
    const MatrixSet experts(ParseDType(dname), 704, 1024, 64);
    for (int64_t T : token_counts) {
      std::vector<float> x(T * experts.cols, 0.5f), y(T * experts.rows);
      const double secs = BestSeconds(3, [&] {
        for (int64_t e = 0; e < experts.count; ++e)
          k.matmul_rows(x.data(), T, experts.At(e), 0, experts.rows, y.data(), experts.rows);
      });
      const double flops = 2.0 * T * experts.rows * experts.cols * experts.count;
      std::printf("| %s | %lld | %.1f | %.1f | %.0f%% |\n", dname.c_str(), (long long)T,
                  flops / secs / 1e9, experts.BytesPerMatrix() * experts.count / secs / 1e9,
                  blas_gflops > 0 ? 100.0 * flops / secs / 1e9 / blas_gflops : 0.0);
    }
  }

  // The decode row stream's own ceiling: one small matrix read over and over from L2, so the
  // GB/s it reaches bounds what it can draw from memory (it must exceed the DRAM bandwidth).
  std::printf("\nDecode GEMV on a [128, 1024] matrix held in L2 (the kernel's own ceiling):\n\n");
  std::printf("| dtype | T | weight GB/s from L2 |\n|---|---|---|\n");
  for (const std::string& dname : bench::SplitList(dtypes_arg)) {
    const MatrixSet small(ParseDType(dname), 128, 1024, 1);
    for (int64_t T : {1, 2}) {
      std::vector<float> x(T * small.cols, 0.5f), y(T * small.rows);
      const int iters = 2000;
      const double secs = BestSeconds(3, [&] {
        for (int i = 0; i < iters; ++i)
          k.matmul_rows(x.data(), T, small.At(0), 0, small.rows, y.data(), small.rows);
      });
      std::printf("| %s | %lld | %.1f |\n", dname.c_str(), (long long)T,
                  small.BytesPerMatrix() * iters / secs / 1e9);
    }
  }

  std::printf("\nProjection [3072, 1024] over T prompt tokens:\n\n");
  std::printf("| dtype | T | GFLOP/s | %% of sgemm |\n|---|---|---|---|\n");
  for (const std::string& dname : bench::SplitList(dtypes_arg)) {
    const MatrixSet proj(ParseDType(dname), 3072, 1024, 1);
    for (int64_t T : token_counts) {
      if (T < 16) continue;
      std::vector<float> x(T * proj.cols, 0.5f), y(T * proj.rows);
      const double secs = BestSeconds(
          3, [&] { k.matmul_rows(x.data(), T, proj.At(0), 0, proj.rows, y.data(), proj.rows); });
      const double gflops = 2.0 * T * proj.rows * proj.cols / secs / 1e9;
      std::printf("| %s | %lld | %.1f | %.0f%% |\n", dname.c_str(), (long long)T, gflops,
                  blas_gflops > 0 ? 100.0 * gflops / blas_gflops : 0.0);
    }
  }
  CompareTablesOn16BShapes();
  return 0;
}
