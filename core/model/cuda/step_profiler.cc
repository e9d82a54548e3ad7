#include "core/model/cuda/step_profiler.h"

#include <cuda_runtime.h>

#include <algorithm>

#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::cuda {

absl::StatusOr<std::unique_ptr<StepProfiler>> StepProfiler::Create(bool per_phase, int max_marks) {
  auto p = std::unique_ptr<StepProfiler>(new StepProfiler(per_phase));
  p->events_.resize(static_cast<size_t>(std::max(max_marks, 1)) + 1, nullptr);
  for (cudaEvent_t& e : p->events_) {
    DSMOE_CUDA_RETURN_IF_ERROR(cudaEventCreate(&e), "profiler event");
  }
  p->phases_.reserve(p->events_.size());
  return p;
}

StepProfiler::~StepProfiler() {
  for (cudaEvent_t e : events_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
}

absl::Status StepProfiler::Begin(cudaStream_t stream) {
  phases_.clear();
  return CudaStatus(cudaEventRecord(events_[0], stream), "profiler event");
}

void StepProfiler::Mark(const char* phase, cudaStream_t stream) {
  if (phases_.size() + 1 >= events_.size()) return;
  if (cudaEventRecord(events_[phases_.size() + 1], stream) == cudaSuccess) {
    phases_.push_back(phase);
  }
}

absl::Status StepProfiler::End() {
  if (phases_.empty()) return absl::OkStatus();
  DSMOE_CUDA_RETURN_IF_ERROR(cudaEventSynchronize(events_[phases_.size()]), "profiler sync");
  for (size_t i = 0; i < phases_.size(); ++i) {
    float ms = 0;
    DSMOE_CUDA_RETURN_IF_ERROR(cudaEventElapsedTime(&ms, events_[i], events_[i + 1]),
                               "profiler elapsed time");
    auto it = std::find_if(totals_.begin(), totals_.end(),
                           [&](const auto& t) { return t.first == phases_[i]; });
    if (it == totals_.end()) it = totals_.insert(totals_.end(), {phases_[i], 0.0});
    it->second += 1e3 * ms;
  }
  ++steps_;
  return absl::OkStatus();
}

}  // namespace dsmoe::cuda
