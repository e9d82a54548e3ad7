// Data-parallel operators built on the per-ISA kernels: what the model code calls. Each takes
// the thread pool it may use; none allocates.
#pragma once

#include <cstdint>

#include "core/ops/kernels.h"
#include "core/tensor/tensor.h"
#include "core/util/thread_pool.h"

namespace dsmoe::ops {

// Splits `rows` into about `tasks_per_thread` contiguous chunks per thread, each a multiple of
// `align` rows, so threads stream disjoint slices of a weight matrix.
int64_t RowChunkSize(int64_t rows, int num_threads, int64_t align = 8, int tasks_per_thread = 2);

// y[t, n] = Σ_k x[t, k] · W[n, k] (+ bias[n]);  x [T, W.cols], y [T, W.rows]. Where the table
// prepares activations (KernelTable::prepared_size), x is prepared once, in parallel, for all
// the row tasks. The first form uses Kernels().
void Linear(ThreadPool& pool, const float* x, int64_t T, const MatrixView& W, const float* bias,
            float* y);
void Linear(ThreadPool& pool, const KernelTable& kernels, const float* x, int64_t T,
            const MatrixView& W, const float* bias, float* y);

// A buffer of at least `bytes`, 64-byte aligned, owned by the calling thread, for activations
// prepared by a KernelTable: grown (reallocated, contents lost) when asked for more than it
// holds, never shrunk, so a warm loop allocates nothing. Valid until the calling thread asks
// again: callers (Linear, RunMlps) use it within one call and never nest.
void* PreparedScratch(int64_t bytes);

// Prepares x [T, K] for weights of `dtype` into `prepared` (kernels.prepared_size(T, K, dtype)
// bytes, nonzero) with the pool's threads, two 16-token tiles per task.
void PrepareActivations(ThreadPool& pool, const KernelTable& kernels, const float* x, int64_t T,
                        int64_t K, DType dtype, void* prepared);

// RMSNorm as HF's DeepseekRMSNorm: out = w ⊙ x / sqrt(mean(x²) + eps), per row of H.
void RmsNorm(const float* x, const float* weight, int64_t T, int64_t H, double eps, float* out);

// y[i] += x[i] for n elements.
void AddInPlace(const float* x, float* y, int64_t n);

}  // namespace dsmoe::ops
