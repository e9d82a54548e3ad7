#include "core/util/memory_limit.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/util/cgroup.h"

namespace dsmoe {

int64_t MemoryLimitFromCgroupV2(absl::string_view memory_max) {
  int64_t bytes = 0;
  const absl::string_view v = absl::StripAsciiWhitespace(memory_max);
  if (v == "max" || !absl::SimpleAtoi(v, &bytes) || bytes <= 0) return 0;
  return bytes;
}

int64_t MemoryLimitFromCgroupV1(absl::string_view limit_in_bytes) {
  int64_t bytes = 0;
  if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(limit_in_bytes), &bytes) || bytes <= 0 ||
      bytes >= (int64_t{1} << 60)) {
    return 0;
  }
  return bytes;
}

int64_t CgroupMemoryLimit() {
  // v2: the process's own cgroup, then the root of the (container's) hierarchy.
  if (const std::string max = ReadCgroupV2File("memory.max"); !max.empty()) {
    return MemoryLimitFromCgroupV2(max);
  }
  return MemoryLimitFromCgroupV1(ReadSmallFile("/sys/fs/cgroup/memory/memory.limit_in_bytes"));
}

int64_t AvailableMemoryBytes() {
  int64_t available = 0;
  for (absl::string_view line : absl::StrSplit(ReadSmallFile("/proc/meminfo"), '\n')) {
    if (!absl::ConsumePrefix(&line, "MemAvailable:")) continue;
    absl::ConsumeSuffix(&line, "kB");
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(line), &available)) available *= 1024;
    break;
  }
  const int64_t limit = CgroupMemoryLimit();
  int64_t used = 0;
  if (limit > 0 &&
      absl::SimpleAtoi(absl::StripAsciiWhitespace(ReadCgroupV2File("memory.current")), &used)) {
    const int64_t left = std::max<int64_t>(0, limit - used);
    available = available > 0 ? std::min(available, left) : left;
  }
  return available;
}

absl::StatusOr<int64_t> ParseByteSize(absl::string_view text) {
  absl::string_view t = absl::StripAsciiWhitespace(text);
  int64_t unit = 1;
  const bool binary = absl::ConsumeSuffix(&t, "i") || absl::ConsumeSuffix(&t, "I");
  if (!t.empty() && absl::ascii_isalpha(t.back())) {
    const char u = absl::ascii_tolower(t.back());
    const int64_t base = binary ? 1024 : 1000;
    const int power = u == 'k' ? 1 : u == 'm' ? 2 : u == 'g' ? 3 : u == 't' ? 4 : 0;
    if (power == 0) {
      return absl::InvalidArgumentError(absl::StrCat("byte size \"", text,
                                                     "\": the unit must be one of K, M, G, T "
                                                     "(decimal) or Ki, Mi, Gi, Ti (binary)"));
    }
    for (int i = 0; i < power; ++i) unit *= base;
    t.remove_suffix(1);
  } else if (binary) {
    return absl::InvalidArgumentError(absl::StrCat("byte size \"", text, "\": no unit before i"));
  }
  double value = 0;
  if (t.empty() || !absl::SimpleAtod(t, &value) || !(value >= 0) ||
      value * static_cast<double>(unit) > std::ldexp(1.0, 62)) {
    return absl::InvalidArgumentError(
        absl::StrCat("byte size \"", text, "\" is not a number of bytes in [0, 2^62]"));
  }
  return static_cast<int64_t>(value * static_cast<double>(unit));
}

std::string FormatBytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) v /= 1024, ++u;
  return u == 0 ? absl::StrCat(bytes, " B") : absl::StrFormat("%.1f %s", v, units[u]);
}

}  // namespace dsmoe
