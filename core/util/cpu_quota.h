// How many CPUs this process may keep busy: the CPUs its affinity mask allows, bounded by its
// cgroup's CPU quota. In a container with `resources.limits.cpu: 4` on a 64-core node,
// std::thread::hardware_concurrency() says 64, and 64 spinning workers on a 4-CPU quota spend
// most of each period throttled; this says 4.
#pragma once

#include <cstdint>

#include "absl/strings/string_view.h"

namespace dsmoe {

// The affinity mask's CPU count, bounded by the cgroup quota (v2 `cpu.max`, or v1
// `cpu.cfs_quota_us` / `cpu.cfs_period_us`) rounded down (at least 1): a thread per started CPU
// of quota would be throttled every period. Reads /proc and /sys each call; thread-safe.
int UsableCpus();

// The CPUs a quota allows, rounded down, at least 1; 0: no quota. Pure, for tests.
// cgroup v2: the contents of cpu.max, "<quota> <period>" or "max <period>".
int CpusFromCgroupV2CpuMax(absl::string_view cpu_max);
// cgroup v1: cfs_quota_us (-1: none) and cfs_period_us.
int CpusFromCgroupV1Quota(int64_t quota_us, int64_t period_us);

}  // namespace dsmoe
