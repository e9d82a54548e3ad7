// Where a forward pass spends its device time: the runner records a CUDA event after each phase
// and the profiler sums the elapsed time between consecutive events per phase name. Coarse
// profiles time the input upload, the whole pass (a CUDA graph's replay for decode steps) and the
// logits download, so that the wall time of a step minus their sum is the host's share;
// per-phase profiles time every layer's pieces (embed, rms_norm, qkv, ..., lm_head) with the
// kernels launched one by one (an event between them stops graph replay). Used by the GPU
// benchmark; never enabled while serving.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/util/status.h"

namespace dsmoe::cuda {

// Thread-compatible. Owns its events.
class StepProfiler {
 public:
  // At most `max_marks` marks per profiled step.
  static absl::StatusOr<std::unique_ptr<StepProfiler>> Create(bool per_phase, int max_marks = 1024);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  // Starts a step on `stream`: records the reference event.
  absl::Status Begin(cudaStream_t stream);
  // Records that the work enqueued since the previous mark belongs to `phase` (a string
  // literal; compared by content). Marks beyond max_marks are dropped.
  void Mark(const char* phase, cudaStream_t stream);
  // Waits for the step's last event and adds each phase's elapsed time to the totals.
  absl::Status End();

  // Phase → total microseconds over all profiled steps, in first-seen order.
  const std::vector<std::pair<std::string, double>>& totals_us() const { return totals_; }
  int steps() const { return steps_; }
  bool per_phase() const { return per_phase_; }

 private:
  explicit StepProfiler(bool per_phase) : per_phase_(per_phase) {}
  const bool per_phase_;
  std::vector<cudaEvent_t> events_;  // [0] = Begin, then one per mark
  std::vector<const char*> phases_;  // phase of events_[i + 1]
  std::vector<std::pair<std::string, double>> totals_;
  int steps_ = 0;
};

}  // namespace dsmoe::cuda
