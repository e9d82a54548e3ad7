#include "core/util/device.h"

#include <charconv>

namespace dsmoe {

std::string Device::ToString() const { return is_cuda() ? "cuda:" + std::to_string(index) : "cpu"; }

absl::StatusOr<Device> ParseDevice(std::string_view text) {
  if (text == "cpu") return Device{};
  if (text == "cuda") return Device{Device::Kind::kCuda, 0};
  constexpr std::string_view kCuda = "cuda:";
  if (text.substr(0, kCuda.size()) == kCuda) {
    const std::string_view digits = text.substr(kCuda.size());
    int index = -1;
    const auto [end, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
    if (ec == std::errc() && end == digits.data() + digits.size() && !digits.empty() &&
        index >= 0) {
      return Device{Device::Kind::kCuda, index};
    }
  }
  return absl::InvalidArgumentError(
      absl::StrCat("device \"", std::string(text), "\" is not one of cpu, cuda, cuda:N"));
}

absl::Status NoCudaBackendError(const Device& device) {
  return absl::FailedPreconditionError(
      absl::StrCat("--device ", device.ToString(),
                   ": this build of dsmoe has no CUDA backend (build with -DDSMOE_CUDA=ON, "
                   "e.g. scripts/build-cuda.sh)"));
}

}  // namespace dsmoe
