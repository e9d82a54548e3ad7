#include "core/util/log.h"

#include <cstdio>

namespace dsmoe {

const char* LogLevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarning:
      return "warning";
    case LogLevel::kError:
      return "error";
  }
  return "unknown";
}

void StdioLogger::Log(LogLevel level, std::string_view message) {
  std::FILE* out = level == LogLevel::kInfo ? stdout : stderr;
  // One locked sequence per line, so lines from concurrent threads never interleave.
  flockfile(out);
  std::fwrite(message.data(), 1, message.size(), out);
  std::fputc('\n', out);
  std::fflush(out);
  funlockfile(out);
}

Logger* DefaultLogger() {
  static Logger* const logger = new StdioLogger();  // never destroyed (see the header)
  return logger;
}

void CapturingLogger::Log(LogLevel level, std::string_view message) {
  absl::MutexLock lock(&mu_);
  entries_.push_back(Entry{level, std::string(message)});
}

std::vector<CapturingLogger::Entry> CapturingLogger::entries() const {
  absl::MutexLock lock(&mu_);
  return entries_;
}

std::vector<std::string> CapturingLogger::lines() const {
  absl::MutexLock lock(&mu_);
  std::vector<std::string> lines;
  lines.reserve(entries_.size());
  for (const Entry& e : entries_) lines.push_back(e.message);
  return lines;
}

bool CapturingLogger::Contains(std::string_view needle) const {
  absl::MutexLock lock(&mu_);
  for (const Entry& e : entries_) {
    if (e.message.find(needle) != std::string::npos) return true;
  }
  return false;
}

}  // namespace dsmoe
