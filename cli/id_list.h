// "1,2,3" → token ids, with an error naming the flag and the bad item.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/util/status.h"

namespace dsmoe::cli {

absl::StatusOr<std::vector<int32_t>> ParseIdList(const std::string& text, const char* flag);

}  // namespace dsmoe::cli
