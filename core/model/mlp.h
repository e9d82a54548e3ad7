// Runs a group of SwiGLU MLPs — the routed experts a batch chose, the shared experts, or a dense
// layer — as two parallel loops over all of them together: first every gate/up row (SiLU
// fused), then every down row. Many small experts (fine-grained segmentation makes them
// small) thus keep every thread busy with contiguous weight rows, and each expert's weights
// are streamed once for all the tokens routed to it.
#pragma once

#include <cstdint>

#include "core/model/weights.h"
#include "core/ops/kernels.h"
#include "core/util/thread_pool.h"

namespace dsmoe {

struct MlpJob {
  const MlpWeights* mlp = nullptr;
  const float* x = nullptr;  // [n, H] input rows
  int64_t n = 0;             // number of tokens
  float* act = nullptr;      // [n, width] scratch; holds silu(gate)·up after the first loop
  float* up = nullptr;       // [n, width] scratch
  float* out = nullptr;      // [n, H] result
};

// Where the kernel table prepares activations (ops::KernelTable::prepared_size), each job's x is
// prepared once for both its gate and up rows, and its act once for its down rows, all jobs'
// in one parallel loop before the rows'. The first form uses ops::Kernels().
void RunMlps(ThreadPool& pool, const MlpJob* jobs, int64_t num_jobs, int64_t hidden);
void RunMlps(ThreadPool& pool, const ops::KernelTable& kernels, const MlpJob* jobs,
             int64_t num_jobs, int64_t hidden);

}  // namespace dsmoe
