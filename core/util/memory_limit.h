// How much memory this process may use: its cgroup's limit (a container's
// `resources.limits.memory`), and byte sizes as operators write them ("16Gi", "512M").
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "core/util/status.h"

namespace dsmoe {

// The cgroup memory limit in bytes (v2 `memory.max` of the process's cgroup, then the root;
// v1 `memory.limit_in_bytes`); 0: none. Reads /proc and /sys each call; thread-safe.
int64_t CgroupMemoryLimit();

// Memory this process could still take without the kernel reclaiming anything it cannot drop:
// /proc/meminfo's MemAvailable (free memory plus page cache that can be dropped), lowered to
// what the cgroup limit leaves above the cgroup's current use (v2 `memory.current`; the page
// cache it counts is not subtracted back, so this is a lower bound there). 0 where neither can
// be read. Reads /proc and /sys each call; thread-safe.
int64_t AvailableMemoryBytes();

// Pure, for tests. cgroup v2 memory.max: "<bytes>" or "max" (0). v1 limit_in_bytes: a number,
// where anything from 2^60 up (the kernel's "unlimited", page-rounded LONG_MAX) means none.
int64_t MemoryLimitFromCgroupV2(absl::string_view memory_max);
int64_t MemoryLimitFromCgroupV1(absl::string_view limit_in_bytes);

// "123", "16Gi", "512Mi", "64Ki", "2G", "500M", "1k" (binary with i, decimal without; case of
// the unit letter ignored). INVALID_ARGUMENT naming the text otherwise, or when negative or
// beyond 2^62.
absl::StatusOr<int64_t> ParseByteSize(absl::string_view text);
// "1.5 GiB", "512.0 MiB", "100 B": what logs and errors show.
std::string FormatBytes(int64_t bytes);

}  // namespace dsmoe
