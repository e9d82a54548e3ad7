#include "core/model/mlp.h"

#include <cstdint>
#include <vector>

#include "core/ops/ops.h"

namespace dsmoe {

namespace {

// Enumerates (job, row range) tasks over jobs whose row counts are given by `rows_of`, each job
// cut into chunks of `chunk` rows; `fn(job, r0, r1)` runs one task.
template <class RowsOf, class Fn>
void ForEachRowChunk(ThreadPool& pool, const MlpJob* jobs, int64_t num_jobs, RowsOf rows_of,
                     Fn fn) {
  int64_t total_rows = 0;
  for (int64_t j = 0; j < num_jobs; ++j) total_rows += rows_of(jobs[j]);
  const int64_t chunk = ops::RowChunkSize(total_rows, pool.num_threads());
  int64_t num_tasks = 0;
  for (int64_t j = 0; j < num_jobs; ++j) num_tasks += (rows_of(jobs[j]) + chunk - 1) / chunk;
  pool.ParallelFor(num_tasks, [&](int64_t task, int) {
    int64_t j = 0;
    for (;; ++j) {  // jobs are few (≤ experts per layer): a scan beats a prefix table here
      const int64_t job_tasks = (rows_of(jobs[j]) + chunk - 1) / chunk;
      if (task < job_tasks) break;
      task -= job_tasks;
    }
    const int64_t rows = rows_of(jobs[j]);
    const int64_t r0 = task * chunk;
    fn(jobs[j], r0, r0 + chunk < rows ? r0 + chunk : rows);
  });
}

// What one job multiplies in a loop: input [job.n, W->cols] times W; W null: nothing to prepare.
struct MlpInput {
  const float* x = nullptr;
  const MatrixView* W = nullptr;
};

// Prepares every job's input where the table prepares it (offsets[j]: where job j's lies in
// the returned buffer; -1 where it is not prepared and the rows use matmul_rows), all jobs'
// 32-token slices in one parallel loop. Null when nothing is prepared.
template <class InputOf>
uint8_t* PrepareInputs(ThreadPool& pool, const ops::KernelTable& k, const MlpJob* jobs,
                       int64_t num_jobs, InputOf input_of, std::vector<int64_t>& offsets) {
  offsets.assign(static_cast<size_t>(num_jobs), -1);  // grows once: a warm loop allocates nothing
  if (k.prepared_size == nullptr) return nullptr;
  constexpr int64_t kTokensPerTask = 32;
  int64_t total = 0, num_tasks = 0;
  for (int64_t j = 0; j < num_jobs; ++j) {
    const MlpInput in = input_of(jobs[j]);
    if (in.W == nullptr) continue;
    const int64_t bytes = k.prepared_size(jobs[j].n, in.W->cols, in.W->dtype);
    if (bytes <= 0) continue;
    offsets[j] = total;
    total += (bytes + 63) / 64 * 64;  // each job's tiles 64-byte aligned
    num_tasks += (jobs[j].n + kTokensPerTask - 1) / kTokensPerTask;
  }
  if (total == 0) return nullptr;
  uint8_t* base = static_cast<uint8_t*>(ops::PreparedScratch(total));
  pool.ParallelFor(num_tasks, [&](int64_t task, int) {
    int64_t j = 0;
    for (;; ++j) {  // as in ForEachRowChunk: jobs are few
      if (offsets[j] < 0) continue;
      const int64_t job_tasks = (jobs[j].n + kTokensPerTask - 1) / kTokensPerTask;
      if (task < job_tasks) break;
      task -= job_tasks;
    }
    const MlpInput in = input_of(jobs[j]);
    const int64_t t0 = task * kTokensPerTask, n = jobs[j].n;
    k.prepare(in.x, n, in.W->cols, in.W->dtype, t0,
              t0 + kTokensPerTask < n ? t0 + kTokensPerTask : n, base + offsets[j]);
  });
  return base;
}

}  // namespace

void RunMlps(ThreadPool& pool, const MlpJob* jobs, int64_t num_jobs, int64_t hidden) {
  RunMlps(pool, ops::Kernels(), jobs, num_jobs, hidden);
}

void RunMlps(ThreadPool& pool, const ops::KernelTable& k, const MlpJob* jobs, int64_t num_jobs,
             int64_t hidden) {
  // Where each job's prepared input lies in the one buffer of ops::PreparedScratch (-1: not
  // prepared); thread-local like that buffer, grown once.
  // (Named through a reference: the lambdas below run on the pool's threads too, where the
  // name of a thread_local would mean that thread's own, empty vector.)
  thread_local std::vector<int64_t> owner_offsets;
  std::vector<int64_t>& offsets = owner_offsets;
  // 1) act = silu(x·gateᵀ) ⊙ (x·upᵀ), over the intermediate rows of every job. gate and up read
  // the same x: one preparation serves both where they share a dtype (they always do in the
  // checkpoints dsmoe writes).
  const uint8_t* prepared = PrepareInputs(
      pool, k, jobs, num_jobs,
      [](const MlpJob& j) {
        return MlpInput{j.x, j.mlp->gate.dtype == j.mlp->up.dtype ? &j.mlp->gate : nullptr};
      },
      offsets);
  ForEachRowChunk(
      pool, jobs, num_jobs, [](const MlpJob& j) { return j.mlp->width(); },
      [&](const MlpJob& j, int64_t r0, int64_t r1) {
        const int64_t W = j.mlp->width();
        const int64_t offset = offsets[&j - jobs];
        if (offset >= 0) {
          k.matmul_rows_prepared(prepared + offset, j.n, j.mlp->gate, r0, r1, j.act, W);
          k.matmul_rows_prepared(prepared + offset, j.n, j.mlp->up, r0, r1, j.up, W);
        } else {
          k.matmul_rows(j.x, j.n, j.mlp->gate, r0, r1, j.act, W);
          k.matmul_rows(j.x, j.n, j.mlp->up, r0, r1, j.up, W);
        }
        for (int64_t t = 0; t < j.n; ++t) {
          k.silu_mul(j.act + t * W + r0, j.up + t * W + r0, j.act + t * W + r0, r1 - r0);
        }
      });
  // 2) out = act·downᵀ, over the hidden rows of every job (act prepared the same way; the
  // buffer of step 1 is no longer read and is reused).
  prepared = PrepareInputs(
      pool, k, jobs, num_jobs,
      [](const MlpJob& j) {
        return MlpInput{j.act, &j.mlp->down};
      },
      offsets);
  ForEachRowChunk(
      pool, jobs, num_jobs, [hidden](const MlpJob&) { return hidden; },
      [&](const MlpJob& j, int64_t r0, int64_t r1) {
        const int64_t offset = offsets[&j - jobs];
        if (offset >= 0) {
          k.matmul_rows_prepared(prepared + offset, j.n, j.mlp->down, r0, r1, j.out, hidden);
        } else {
          k.matmul_rows(j.act, j.n, j.mlp->down, r0, r1, j.out, hidden);
        }
      });
}

}  // namespace dsmoe
