// The attention server's forward-pass engine on the chosen device: the CPU ModelRunner, or the
// GPU's CudaModelRunner where dsmoe was built with DSMOE_CUDA. Either way the runner holds the
// scheduler's slots plus one scratch slot, and routed experts go to `experts` when given.
#pragma once

#include <memory>

#include "attention-server/scheduler.h"
#include "core/model/model_runner.h"
#include "core/util/device.h"

namespace dsmoe {

// FAILED_PRECONDITION with the reason when the device cannot be used: a build without the CUDA
// backend, or no usable GPU ("no CUDA device: ...").
// REQUIRES: weights, pool and experts (if given) outlive the runner.
absl::StatusOr<std::unique_ptr<BatchRunner>> CreateBatchRunner(const Device& device,
                                                               const ModelWeights& weights,
                                                               ThreadPool& pool,
                                                               const SchedulerOptions& options,
                                                               RoutedExpertExecutor* experts);

}  // namespace dsmoe
