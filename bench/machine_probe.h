// What this machine can do, measured in the same run as the benchmarks that are judged
// against it: read bandwidth (1–16 streams per thread, huge pages and 4 KiB pages), the rate
// at which the decode kernel reads, the fp32 FMA rate of
// dsmoe's own GEMM kernel, and OpenBLAS sgemm where the binary was built with it.
#pragma once

#include <immintrin.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <vector>

#include "core/ops/kernels.h"
#include "core/util/cpu_features.h"
#include "core/util/huge_pages.h"
#include "core/util/thread_pool.h"

#ifdef DSMOE_HAVE_OPENBLAS
#include <cblas.h>
#endif

namespace dsmoe::bench {

// Sums `streams` separate regions of [begin, end) at once, one 64-byte line of each per
// iteration, as the decode kernel reads several weight rows side by side: the hardware
// prefetchers track each stream, so more streams keep more lines in flight than one sequential
// read does. Integer adds on independent accumulators, so no arithmetic latency bounds the rate.
// A template, so that the accumulators stay in registers.
template <int kStreams>
__attribute__((target("avx2"))) inline int64_t SumStreams(const std::byte* begin,
                                                          const std::byte* end) {
  constexpr size_t kLine = 64;
  const size_t lines = static_cast<size_t>(end - begin) / kLine / kStreams;
  __m256i acc[kStreams];
  for (int s = 0; s < kStreams; ++s) acc[s] = _mm256_setzero_si256();
  for (size_t i = 0; i < lines; ++i) {
    for (int s = 0; s < kStreams; ++s) {
      const auto* line =
          reinterpret_cast<const __m256i*>(begin + (static_cast<size_t>(s) * lines + i) * kLine);
      acc[s] = _mm256_add_epi32(
          acc[s], _mm256_add_epi32(_mm256_load_si256(line), _mm256_load_si256(line + 1)));
    }
  }
  int64_t total = 0;
  for (int s = 0; s < kStreams; ++s) {
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[s]);
    for (int32_t v : lanes) total += v;
  }
  return total;
}

inline int64_t SumStreams(const std::byte* begin, const std::byte* end, int streams) {
  switch (streams) {
    case 1:
      return SumStreams<1>(begin, end);
    case 2:
      return SumStreams<2>(begin, end);
    case 4:
      return SumStreams<4>(begin, end);
    case 8:
      return SumStreams<8>(begin, end);
    default:
      return SumStreams<16>(begin, end);
  }
}

// What reading memory can reach: the best GB/s (of 3 tries each) of summing `bytes`, split over
// the pool's threads, each thread reading 1, 2, 4, 8 or 16 streams at once. Decode reads
// weights at most this fast, so it is the roofline's bandwidth (the old probe — one sequential
// stream per thread — read less than decode itself moved on a Zen 4 machine). With
// `streams_used`, also the stream count that reached it. 0 without AVX2.
inline double ReadBandwidth(ThreadPool& pool, size_t bytes, bool huge_pages,
                            int* streams_used = nullptr) {
  if (!GetCpuFeatures().avx2) return 0;
  std::unique_ptr<HugePageBuffer> huge;
  void* plain = nullptr;
  std::byte* data;
  if (huge_pages) {
    huge = *HugePageBuffer::Allocate(bytes);
    data = huge->data();
  } else {
    plain = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(plain, bytes, MADV_NOHUGEPAGE);
    data = static_cast<std::byte*>(plain);
  }
  std::memset(data, 1, bytes);  // every page present before timing
  const int threads = pool.num_threads();
  const size_t per_thread = bytes / threads / 4096 * 4096;
  std::vector<int64_t> sink(threads);
  double best = 0;
  for (int streams : {1, 2, 4, 8, 16}) {
    for (int rep = 0; rep < 3; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      pool.ParallelFor(threads, [&](int64_t task, int) {
        const std::byte* begin = data + per_thread * task;
        sink[task] = SumStreams(begin, begin + per_thread, streams);
      });
      const double secs =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double gbs = static_cast<double>(per_thread * threads) / secs / 1e9;
      if (gbs > best) {
        best = gbs;
        if (streams_used != nullptr) *streams_used = streams;
      }
    }
  }
  if (plain != nullptr) munmap(plain, bytes);
  return best;
}

// GB/s the decode kernel itself reads: the table's matmul_rows for one token over a BF16
// matrix of `bytes` (rows split over the threads, as the engine splits them), best of 3. A
// bandwidth probe below this figure is no upper bound.
inline double GemvBandwidth(ThreadPool& pool, size_t bytes) {
  const int64_t K = 2048, N = static_cast<int64_t>(bytes / (2 * K));
  std::unique_ptr<HugePageBuffer> buffer =
      *HugePageBuffer::Allocate(static_cast<size_t>(N * K * 2));
  std::memset(buffer->data(), 0x3c, buffer->size());  // bf16 0x3c3c ≈ 0.0115
  const MatrixView W{DType::kBF16, N, K, buffer->data()};
  std::vector<float> x(K, 1.0f), y(N);
  const ops::KernelTable& k = ops::Kernels();
  const int threads = pool.num_threads();
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.ParallelFor(threads, [&](int64_t task, int) {
      const int64_t r0 = N * task / threads, r1 = N * (task + 1) / threads;
      k.matmul_rows(x.data(), 1, W, r0, r1, y.data(), N);
    });
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(N * K * 2) / secs / 1e9);
  }
  return best;
}

// GFLOP/s of the fp32 GEMM kernel on L2-resident blocks, every thread on its own block (the
// compute ceiling prefill is judged by).
inline double GemmRate(ThreadPool& pool) {
  const int64_t N = 128, K = 512, T = 64;
  const int threads = pool.num_threads();
  std::vector<std::vector<float>> w(threads, std::vector<float>(N * K, 0.01f)),
      x(threads, std::vector<float>(T * K, 0.02f)), y(threads, std::vector<float>(T * N));
  const ops::KernelTable& k = ops::Kernels();
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const int iters = 40;
    const auto t0 = std::chrono::steady_clock::now();
    pool.ParallelFor(threads, [&](int64_t task, int) {
      const MatrixView W{DType::kF32, N, K, w[task].data()};
      for (int i = 0; i < iters; ++i) k.matmul_rows(x[task].data(), T, W, 0, N, y[task].data(), N);
    });
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * N * K * T * iters * threads / secs / 1e9);
  }
  return best;
}

// The machine's fp32 FMA ceiling: GFLOP/s of 8-wide FMAs on registers only (12 independent
// chains, no memory), every thread at once. No GEMM can exceed it; 0 without AVX2/FMA.
// Twelve named accumulators, not an array: gcc keeps an array of vectors in memory here.
__attribute__((target("avx2,fma"))) inline float FmaChains(int64_t iterations, float seed) {
  const __m256 a = _mm256_set1_ps(0.999f), b = _mm256_set1_ps(1e-4f);
  __m256 c0 = _mm256_set1_ps(seed), c1 = _mm256_add_ps(c0, b), c2 = _mm256_add_ps(c1, b),
         c3 = _mm256_add_ps(c2, b), c4 = _mm256_add_ps(c3, b), c5 = _mm256_add_ps(c4, b),
         c6 = _mm256_add_ps(c5, b), c7 = _mm256_add_ps(c6, b), c8 = _mm256_add_ps(c7, b),
         c9 = _mm256_add_ps(c8, b), c10 = _mm256_add_ps(c9, b), c11 = _mm256_add_ps(c10, b);
  for (int64_t it = 0; it < iterations; ++it) {
    c0 = _mm256_fmadd_ps(c0, a, b);
    c1 = _mm256_fmadd_ps(c1, a, b);
    c2 = _mm256_fmadd_ps(c2, a, b);
    c3 = _mm256_fmadd_ps(c3, a, b);
    c4 = _mm256_fmadd_ps(c4, a, b);
    c5 = _mm256_fmadd_ps(c5, a, b);
    c6 = _mm256_fmadd_ps(c6, a, b);
    c7 = _mm256_fmadd_ps(c7, a, b);
    c8 = _mm256_fmadd_ps(c8, a, b);
    c9 = _mm256_fmadd_ps(c9, a, b);
    c10 = _mm256_fmadd_ps(c10, a, b);
    c11 = _mm256_fmadd_ps(c11, a, b);
  }
  const __m256 sum =
      _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
                                  _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7))),
                    _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)));
  return _mm256_cvtss_f32(sum);
}

inline double FmaPeak(ThreadPool& pool) {
  if (!GetCpuFeatures().HasAvx2Kernels()) return 0;
  const int threads = pool.num_threads();
  const int64_t iterations = 20'000'000;
  std::vector<float> sink(threads);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.ParallelFor(threads, [&](int64_t task, int) {
      sink[task] = FmaChains(iterations, static_cast<float>(task));
    });
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * 8 * 12 * iterations * threads / secs / 1e9);
  }
  return best;
}

// GFLOP/s of OpenBLAS sgemm (x · Wᵀ, 256 × 1024 × 1024 fp32, best of 5) on `threads` threads;
// 0 when this binary was built without OpenBLAS.
inline double SgemmRate(int threads) {
#ifdef DSMOE_HAVE_OPENBLAS
  openblas_set_num_threads(threads);
  const int64_t M = 256, N = 1024, K = 1024;
  std::vector<float> a(M * K, 0.01f), b(N * K, 0.02f), c(M * N);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, a.data(), K, b.data(), K,
                0.0f, c.data(), N);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * M * N * K / secs / 1e9);
  }
  openblas_set_num_threads(1);  // no OpenBLAS workers competing with the engine's threads later
  return best;
#else
  (void)threads;
  return 0;
#endif
}

}  // namespace dsmoe::bench
