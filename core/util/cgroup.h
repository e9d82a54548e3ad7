// Reading the control group this process runs in (what a container's CPU and memory limits
// are): cgroup v2 files, looked up in the process's own cgroup first, then at the root of the
// hierarchy a container sees; and the plain file reads the v1 fallbacks use.
#pragma once

#include <string>

namespace dsmoe {

// The whole text of a small file (a /proc or /sys entry); "" when it cannot be read.
std::string ReadSmallFile(const std::string& path);

// The text of cgroup v2 interface file `name` (e.g. "cpu.max", "memory.max") of the process's
// own cgroup ("0::<path>" in /proc/self/cgroup), else of /sys/fs/cgroup; "" when neither has it
// (cgroup v1, or no limit files).
std::string ReadCgroupV2File(const std::string& name);

}  // namespace dsmoe
