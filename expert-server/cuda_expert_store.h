// An expert server's experts on one GPU (`--device cuda:N`). Only in builds with DSMOE_CUDA.
#pragma once

#include <memory>

#include "expert-server/expert_store.h"

namespace dsmoe::cuda {

// Uploads the experts `selection` names to GPU options.device.index as bf16; the host copy is
// read straight from the checkpoint's mapping and dropped once uploaded.
absl::StatusOr<std::unique_ptr<ExpertStore>> OpenCudaExpertStore(const ExpertStoreOptions& options,
                                                                 const WeightSelection& selection);

}  // namespace dsmoe::cuda
