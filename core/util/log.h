// What library code says about itself (a server marked down, a placement loaded, a transport
// falling back) goes through one small interface, injected like leveldb's Options::info_log: each
// component's Options carries a `Logger*` that defaults to the process-wide stdio logger, so a
// program that injects nothing prints exactly what it printed before, and a test injects a
// CapturingLogger to read what a server said.
//
// Call sites format the line themselves (absl::StrCat / absl::StrFormat) and pass it without
// its trailing newline:
//   options_.logger->Log(LogLevel::kWarning, absl::StrCat("dispatch: ", name, ": ", why));
//
// The mains and the `dsmoe` tool still print their own user-facing output directly; this is for
// the libraries under them.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace dsmoe {

enum class LogLevel : int {
  kInfo = 0,     // progress and state changes (ready, a placement serving, a channel open)
  kWarning = 1,  // degraded but serving (a fallback to gRPC, plain-text serving)
  kError = 2,    // something failed (a placement did not load, a rebalance failed)
};
const char* LogLevelName(LogLevel level);  // "info", "warning", "error"

// Thread-safe: every implementation must accept Log from any number of threads at once (the
// health checker's thread, gRPC's callback threads and the scheduler's loop all log), and keep
// each call's line whole. Log may be called with the caller's locks held, so it must not call
// back into dsmoe code.
class Logger {
 public:
  virtual ~Logger() = default;
  // `message` is one line without its trailing newline.
  virtual void Log(LogLevel level, std::string_view message) = 0;
};

// Writes each line as the library code always has: kInfo to stdout, kWarning and kError to
// stderr, the message unchanged plus '\n', flushed at once (server logs are files or pipes,
// where stdout is otherwise block-buffered and lines would appear late and out of order with
// stderr's).
class StdioLogger final : public Logger {
 public:
  void Log(LogLevel level, std::string_view message) override;
};

// The process-wide StdioLogger every Options struct defaults to. Never destroyed, so components
// that log during static destruction or from detached threads still have it.
Logger* DefaultLogger();

// Keeps every line in memory, for tests. Thread-safe.
class CapturingLogger final : public Logger {
 public:
  struct Entry {
    LogLevel level;
    std::string message;
  };
  void Log(LogLevel level, std::string_view message) override;

  std::vector<Entry> entries() const;      // in the order they were logged
  std::vector<std::string> lines() const;  // the messages alone
  // Whether some line contains `needle`.
  bool Contains(std::string_view needle) const;

 private:
  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dsmoe
