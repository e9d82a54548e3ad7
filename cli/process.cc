#include "cli/process.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cerrno>
#include <cstring>
#include <memory>

#include "core/io/mapped_file.h"
#include "core/util/cpu_quota.h"

extern char** environ;

namespace dsmoe::cli {

namespace {

// Sets the calling thread's affinity mask to `cpus` for its lifetime and restores the previous
// one after. posix_spawn has no affinity attribute, but the child starts with the mask of the
// thread that spawns it, so pinning this thread around the call pins the child from its first
// instruction (setting it on the pid afterwards would race the threads the child starts).
class ScopedAffinity {
 public:
  static absl::StatusOr<std::unique_ptr<ScopedAffinity>> Pin(const std::vector<int>& cpus) {
    auto scoped = std::unique_ptr<ScopedAffinity>(new ScopedAffinity);
    if (sched_getaffinity(0, sizeof(scoped->saved_), &scoped->saved_) != 0) {
      return absl::InternalError(absl::StrCat("sched_getaffinity: ", std::strerror(errno)));
    }
    cpu_set_t mask;
    CPU_ZERO(&mask);
    for (int c : cpus) {
      if (c < 0 || c >= CPU_SETSIZE) {
        return absl::InvalidArgumentError(absl::StrCat("CPU ", c, " is out of range"));
      }
      CPU_SET(c, &mask);
    }
    if (sched_setaffinity(0, sizeof(mask), &mask) != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot pin to CPUs ", FormatCpuList(cpus), ": ", std::strerror(errno)));
    }
    scoped->pinned_ = true;
    return scoped;
  }
  ~ScopedAffinity() {
    if (pinned_) sched_setaffinity(0, sizeof(saved_), &saved_);
  }

 private:
  ScopedAffinity() = default;
  cpu_set_t saved_;
  bool pinned_ = false;
};

}  // namespace

absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& log,
                            const std::vector<int>& cpus) {
  std::unique_ptr<ScopedAffinity> pinned;
  if (!cpus.empty()) {
    DSMOE_ASSIGN_OR_RETURN(pinned, ScopedAffinity::Pin(cpus));
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  posix_spawnattr_t attr;
  posix_spawnattr_init(&attr);
  posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSID | POSIX_SPAWN_SETSIGMASK);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attr, &none);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, args[0], &actions, &attr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attr);
  if (rc != 0)
    return absl::InternalError(absl::StrCat("cannot start ", argv[0], ": ", std::strerror(rc)));
  return pid;
}

absl::Status RunToCompletion(const std::vector<std::string>& argv, const std::string& log) {
  DSMOE_ASSIGN_OR_RETURN(pid_t pid, Spawn(argv, log));
  int status = 0;
  while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return absl::OkStatus();
  std::string command;
  for (const std::string& a : argv) absl::StrAppend(&command, command.empty() ? "" : " ", a);
  return absl::InternalError(
      absl::StrCat("`", command, "` failed; ", log, " ends with:\n", Tail(log)));
}

std::string Tail(const std::string& path, size_t bytes) {
  auto text = ReadTextFile(path, 64 << 20);
  if (!text.ok()) return "";
  return text->size() > bytes ? text->substr(text->size() - bytes) : *text;
}

}  // namespace dsmoe::cli
