#include "cli/id_list.h"

#include <climits>

namespace dsmoe::cli {

absl::StatusOr<std::vector<int32_t>> ParseIdList(const std::string& text, const char* flag) {
  std::vector<int32_t> ids;
  size_t i = 0;
  while (i < text.size()) {
    size_t end = text.find(',', i);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(i, end - i);
    size_t used = 0;
    long long v = -1;
    try {
      v = std::stoll(item, &used);
    } catch (...) {
      used = 0;
    }
    if (item.empty() || used != item.size() || v < 0 || v > INT32_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(flag, ": '", item,
                       "' is not a token id (expected a comma-separated "
                       "list of non-negative integers, e.g. 1,2,3)"));
    }
    ids.push_back(static_cast<int32_t>(v));
    i = end + 1;
  }
  if (ids.empty())
    return absl::InvalidArgumentError(absl::StrCat(flag, ": empty list of token ids"));
  return ids;
}

}  // namespace dsmoe::cli
