#include "core/ops/ops.h"

#include <cmath>
#include <new>

namespace dsmoe::ops {

int64_t RowChunkSize(int64_t rows, int num_threads, int64_t align, int tasks_per_thread) {
  const int64_t tasks = static_cast<int64_t>(num_threads) * tasks_per_thread;
  int64_t chunk = (rows + tasks - 1) / tasks;
  chunk = (chunk + align - 1) / align * align;
  return chunk < align ? align : chunk;
}

void* PreparedScratch(int64_t bytes) {
  struct Buffer {
    void* data = nullptr;
    int64_t size = 0;
    ~Buffer() { ::operator delete (data, std::align_val_t{64}); }
  };
  thread_local Buffer buffer;
  if (bytes > buffer.size) {
    ::operator delete (buffer.data, std::align_val_t{64});
    buffer.data = nullptr;  // no dangling pointer if the allocation below throws
    buffer.size = 0;
    buffer.data = ::operator new (static_cast<size_t>(bytes), std::align_val_t{64});
    buffer.size = bytes;
  }
  return buffer.data;
}

void PrepareActivations(ThreadPool& pool, const KernelTable& kernels, const float* x, int64_t T,
                        int64_t K, DType dtype, void* prepared) {
  constexpr int64_t kTokensPerTask = 32;  // two tiles: 256 KiB of x at K = 2048
  pool.ParallelFor((T + kTokensPerTask - 1) / kTokensPerTask, [&](int64_t task, int) {
    const int64_t t0 = task * kTokensPerTask;
    kernels.prepare(x, T, K, dtype, t0, t0 + kTokensPerTask < T ? t0 + kTokensPerTask : T,
                    prepared);
  });
}

void Linear(ThreadPool& pool, const float* x, int64_t T, const MatrixView& W, const float* bias,
            float* y) {
  Linear(pool, Kernels(), x, T, W, bias, y);
}

void Linear(ThreadPool& pool, const KernelTable& k, const float* x, int64_t T, const MatrixView& W,
            const float* bias, float* y) {
  const int64_t N = W.rows;
  // Decode streams each thread's rows in few long chunks; batches and prompt chunks are
  // compute-bound, and finer chunks keep both cores busy to the end when one is interrupted.
  const int64_t chunk = RowChunkSize(N, pool.num_threads(), 8, T >= 16 ? 8 : 2);
  const int64_t num_tasks = (N + chunk - 1) / chunk;
  // Finer chunks would each convert all of x again: prepare it once for every chunk instead.
  const int64_t prepared_bytes =
      k.prepared_size != nullptr ? k.prepared_size(T, W.cols, W.dtype) : 0;
  void* prepared = nullptr;
  if (prepared_bytes > 0) {
    prepared = PreparedScratch(prepared_bytes);
    PrepareActivations(pool, k, x, T, W.cols, W.dtype, prepared);
  }
  pool.ParallelFor(num_tasks, [&](int64_t task, int) {
    const int64_t r0 = task * chunk;
    const int64_t r1 = r0 + chunk < N ? r0 + chunk : N;
    if (prepared != nullptr) {
      k.matmul_rows_prepared(prepared, T, W, r0, r1, y, N);
    } else {
      k.matmul_rows(x, T, W, r0, r1, y, N);
    }
    if (bias != nullptr) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t n = r0; n < r1; ++n) y[t * N + n] += bias[n];
    }
  });
}

void RmsNorm(const float* x, const float* weight, int64_t T, int64_t H, double eps, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xr = x + t * H;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < H; ++i) sum_sq += static_cast<double>(xr[i]) * xr[i];
    const float scale = static_cast<float>(1.0 / std::sqrt(sum_sq / static_cast<double>(H) + eps));
    float* o = out + t * H;
    for (int64_t i = 0; i < H; ++i) o[i] = weight[i] * (xr[i] * scale);
  }
}

void AddInPlace(const float* x, float* y, int64_t n) { Kernels().axpy(1.0f, x, y, n); }

}  // namespace dsmoe::ops
