// What this machine can do, measured in the same run as the benchmarks that are judged
// against it: streaming read bandwidth (huge pages and 4 KiB pages), the fp32 FMA rate of
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

// Best-of-3 GB/s of summing `bytes` of floats, split over the pool's threads.
inline double ReadBandwidth(ThreadPool& pool, size_t bytes, bool huge_pages) {
  std::unique_ptr<HugePageBuffer> huge;
  void* plain = nullptr;
  float* data;
  if (huge_pages) {
    huge = *HugePageBuffer::Allocate(bytes);
    data = reinterpret_cast<float*>(huge->data());
  } else {
    plain = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    madvise(plain, bytes, MADV_NOHUGEPAGE);
    data = static_cast<float*>(plain);
  }
  const size_t n = bytes / sizeof(float);
  for (size_t i = 0; i < n; ++i) data[i] = static_cast<float>(i & 1023) * 1e-3f;
  const ops::KernelTable& k = ops::Kernels();
  const int threads = pool.num_threads();
  std::vector<float> ones(4096, 1.0f), partial(threads);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.ParallelFor(threads, [&](int64_t task, int) {
      const size_t begin = n / threads * task,
                   end = task + 1 == threads ? n : n / threads * (task + 1);
      float s = 0;
      for (size_t i = begin; i < end; i += 4096)
        s += k.dot(data + i, ones.data(), static_cast<int64_t>(std::min<size_t>(4096, end - i)));
      partial[task] = s;
    });
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, static_cast<double>(bytes) / secs / 1e9);
  }
  if (plain != nullptr) munmap(plain, bytes);
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
