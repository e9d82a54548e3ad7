#include "core/model/mlp.h"

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

}  // namespace

void RunMlps(ThreadPool& pool, const MlpJob* jobs, int64_t num_jobs, int64_t hidden) {
  const ops::KernelTable& k = ops::Kernels();
  // 1) act = silu(x·gateᵀ) ⊙ (x·upᵀ), over the intermediate rows of every job.
  ForEachRowChunk(
      pool, jobs, num_jobs, [](const MlpJob& j) { return j.mlp->width(); },
      [&](const MlpJob& j, int64_t r0, int64_t r1) {
        const int64_t W = j.mlp->width();
        k.matmul_rows(j.x, j.n, j.mlp->gate, r0, r1, j.act, W);
        k.matmul_rows(j.x, j.n, j.mlp->up, r0, r1, j.up, W);
        for (int64_t t = 0; t < j.n; ++t) {
          k.silu_mul(j.act + t * W + r0, j.up + t * W + r0, j.act + t * W + r0, r1 - r0);
        }
      });
  // 2) out = act·downᵀ, over the hidden rows of every job.
  ForEachRowChunk(
      pool, jobs, num_jobs, [hidden](const MlpJob&) { return hidden; },
      [&](const MlpJob& j, int64_t r0, int64_t r1) {
        k.matmul_rows(j.act, j.n, j.mlp->down, r0, r1, j.out, hidden);
      });
}

}  // namespace dsmoe
