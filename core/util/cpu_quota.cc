#include "core/util/cpu_quota.h"

#include <sched.h>

#include <algorithm>
#include <string>
#include <thread>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "core/util/cgroup.h"

namespace dsmoe {

namespace {

int QuotaCpus() {
  // v2: the process's own cgroup, then the root of the (container's) hierarchy.
  if (const std::string max = ReadCgroupV2File("cpu.max"); !max.empty()) {
    return CpusFromCgroupV2CpuMax(max);
  }
  for (const char* dir : {"/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"}) {
    int64_t quota = 0, period = 0;
    const std::string d(dir);
    if (absl::SimpleAtoi(absl::StripAsciiWhitespace(ReadSmallFile(d + "/cpu.cfs_quota_us")),
                         &quota) &&
        absl::SimpleAtoi(absl::StripAsciiWhitespace(ReadSmallFile(d + "/cpu.cfs_period_us")),
                         &period)) {
      return CpusFromCgroupV1Quota(quota, period);
    }
  }
  return 0;
}

}  // namespace

int CpusFromCgroupV2CpuMax(absl::string_view cpu_max) {
  const std::vector<absl::string_view> fields =
      absl::StrSplit(absl::StripAsciiWhitespace(cpu_max), ' ', absl::SkipEmpty());
  if (fields.size() != 2 || fields[0] == "max") return 0;
  int64_t quota = 0, period = 0;
  if (!absl::SimpleAtoi(fields[0], &quota) || !absl::SimpleAtoi(fields[1], &period)) return 0;
  return CpusFromCgroupV1Quota(quota, period);
}

int CpusFromCgroupV1Quota(int64_t quota_us, int64_t period_us) {
  if (quota_us <= 0 || period_us <= 0) return 0;
  return static_cast<int>(std::max<int64_t>(1, quota_us / period_us));
}

int UsableCpus() {
  int cpus = static_cast<int>(std::thread::hardware_concurrency());
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) == 0) cpus = CPU_COUNT(&mask);
  return CpusWithinQuota(cpus);
}

int CpusWithinQuota(int cpus) {
  if (const int quota = QuotaCpus(); quota > 0) cpus = std::min(cpus, quota);
  return std::max(1, cpus);
}

std::vector<int> AllowedCpus() {
  std::vector<int> cpus;
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return cpus;
  for (int c = 0; c < CPU_SETSIZE; ++c) {
    if (CPU_ISSET(c, &mask)) cpus.push_back(c);
  }
  return cpus;
}

absl::StatusOr<std::vector<int>> ParseCpuList(absl::string_view list) {
  if (absl::StripAsciiWhitespace(list).empty()) {
    return absl::InvalidArgumentError("the CPU list is empty");
  }
  std::vector<int> cpus;
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    item = absl::StripAsciiWhitespace(item);
    const std::vector<absl::string_view> ends = absl::StrSplit(item, absl::MaxSplits('-', 1));
    int first = -1, last = -1;
    if (!absl::SimpleAtoi(ends[0], &first) ||
        !absl::SimpleAtoi(ends.size() == 2 ? ends[1] : ends[0], &last) || first < 0 ||
        last < first || last >= CPU_SETSIZE) {
      return absl::InvalidArgumentError(
          absl::StrCat("'", item, "' in the CPU list '", list,
                       "' is not a CPU number or a range N-M (N <= M < ", CPU_SETSIZE, ")"));
    }
    for (int c = first; c <= last; ++c) cpus.push_back(c);
  }
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

std::string FormatCpuList(const std::vector<int>& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    absl::StrAppend(&out, out.empty() ? "" : ",", cpus[i]);
    if (j > i) absl::StrAppend(&out, "-", cpus[j]);
    i = j + 1;
  }
  return out;
}

}  // namespace dsmoe
