// NumPy .npy (format 1.0) for float32 arrays: how `dsmoe logits` hands results to Python.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/util/status.h"

namespace dsmoe {

absl::Status WriteNpyFloat32(const std::string& path, const std::vector<int64_t>& shape,
                             const float* data);

}  // namespace dsmoe
