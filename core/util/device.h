// Which processor a server computes on: `--device cpu` or `--device cuda:N` (N defaults to 0).
#pragma once

#include <string>
#include <string_view>

#include "core/util/status.h"

namespace dsmoe {

struct Device {
  enum class Kind { kCpu, kCuda };
  Kind kind = Kind::kCpu;
  int index = 0;  // CUDA device ordinal

  bool is_cuda() const { return kind == Kind::kCuda; }
  std::string ToString() const;
};

// "cpu", "cuda", "cuda:N" → Device; anything else INVALID_ARGUMENT naming the text.
absl::StatusOr<Device> ParseDevice(std::string_view text);

// What a server says when asked for a GPU in a build without the CUDA backend.
absl::Status NoCudaBackendError(const Device& device);

}  // namespace dsmoe
