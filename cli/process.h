// Child processes of the `dsmoe` tool: the cluster's servers (detached, in their own session)
// and short tools it runs to completion (openssl).
#pragma once

#include <sys/types.h>

#include <string>
#include <vector>

#include "core/util/status.h"

namespace dsmoe::cli {

// Starts `argv` (argv[0] a path, or a name looked up in PATH) in its own session, so it
// outlives this command and the terminal's ^C, with stdin from /dev/null and stdout and stderr
// appended to `log`. With `cpus` non-empty, the process starts pinned to those CPUs (its affinity
// mask, inherited by every thread it starts); INVALID_ARGUMENT if the kernel refuses the set.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log,
                            const std::vector<int>& cpus = {});

// Runs `argv` to completion with its output appended to `log`; an error names the command and
// quotes the end of the log if it does not exit 0.
absl::Status RunToCompletion(const std::vector<std::string>& argv, const std::string& log);

// The last `bytes` of a text file ("" if unreadable).
std::string Tail(const std::string& path, size_t bytes = 2000);

}  // namespace dsmoe::cli
