// How many CPUs this process may keep busy: the CPUs its affinity mask allows, bounded by its
// cgroup's CPU quota. In a container with `resources.limits.cpu: 4` on a 64-core node,
// std::thread::hardware_concurrency() says 64, and 64 spinning workers on a 4-CPU quota spend
// most of each period throttled; this says 4.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dsmoe {

// The affinity mask's CPU count, bounded by the cgroup quota (v2 `cpu.max`, or v1
// `cpu.cfs_quota_us` / `cpu.cfs_period_us`) rounded down (at least 1): a thread per started CPU
// of quota would be throttled every period. Reads /proc and /sys each call; thread-safe.
int UsableCpus();

// `cpus` bounded by the cgroup quota as UsableCpus bounds the mask's count (at least 1): the
// compute threads of a process that will run on `cpus` CPUs of this machine's container.
int CpusWithinQuota(int cpus);

// The CPUs the calling thread's affinity mask allows, ascending (what a child it starts may be
// pinned to). Empty only if the mask cannot be read.
std::vector<int> AllowedCpus();

// A CPU list as taskset -c and /proc/<pid>/status Cpus_allowed_list write it: "0-3,6" (ranges
// and single CPUs, comma-separated). Ascending, without duplicates; INVALID_ARGUMENT naming
// the bad item for anything else ("", "3-1", "x", a CPU >= CPU_SETSIZE).
absl::StatusOr<std::vector<int>> ParseCpuList(absl::string_view list);
// The reverse: ascending CPUs as the shortest such list ("0-3,6"; "" for none).
std::string FormatCpuList(const std::vector<int>& cpus);

// The CPUs a quota allows, rounded down, at least 1; 0: no quota. Pure, for tests.
// cgroup v2: the contents of cpu.max, "<quota> <period>" or "max <period>".
int CpusFromCgroupV2CpuMax(absl::string_view cpu_max);
// cgroup v1: cfs_quota_us (-1: none) and cfs_period_us.
int CpusFromCgroupV1Quota(int64_t quota_us, int64_t period_us);

}  // namespace dsmoe
