// core/util/log.h: the stdio logger writes the exact lines library code used to print (info on
// stdout, warnings and errors on stderr, each ending in '\n'), read back from the real file
// descriptors; the capturing logger keeps every line whole when many threads log at once.
#include "core/util/log.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"

namespace dsmoe {
namespace {

// Points file descriptor `fd` at a temporary file until Restore(), then returns what was
// written to it.
class Redirect {
 public:
  Redirect(int fd, std::FILE* stream) : fd_(fd), stream_(stream) {
    path_ =
        ::testing::TempDir() + "log_test_" + std::to_string(fd) + "_" + std::to_string(::getpid());
    std::fflush(stream_);
    saved_ = ::dup(fd_);
    std::FILE* f = std::fopen(path_.c_str(), "w");
    ::dup2(::fileno(f), fd_);
    std::fclose(f);
  }
  std::string Restore() {
    std::fflush(stream_);
    ::dup2(saved_, fd_);
    ::close(saved_);
    std::ifstream in(path_);
    std::stringstream text;
    text << in.rdbuf();
    std::remove(path_.c_str());
    return text.str();
  }

 private:
  int fd_;
  std::FILE* stream_;
  int saved_ = -1;
  std::string path_;
};

TEST(StdioLogger, InfoGoesToStdoutWarningsAndErrorsToStderrAsLinesUnchanged) {
  StdioLogger logger;
  Redirect out(STDOUT_FILENO, stdout), err(STDERR_FILENO, stderr);
  logger.Log(LogLevel::kInfo, "dsmoe-gateway: ready");
  logger.Log(LogLevel::kWarning, "dispatch: expert server 1: this call goes by gRPC: closed");
  logger.Log(LogLevel::kInfo, "rebalance: placement 3 in use in 0.250 s");
  logger.Log(LogLevel::kError, "rebalance: failed: no plan");
  logger.Log(LogLevel::kInfo, "");
  const std::string got_err = err.Restore();
  const std::string got_out = out.Restore();
  EXPECT_EQ(got_out, "dsmoe-gateway: ready\nrebalance: placement 3 in use in 0.250 s\n\n");
  EXPECT_EQ(got_err,
            "dispatch: expert server 1: this call goes by gRPC: closed\n"
            "rebalance: failed: no plan\n");
}

TEST(StdioLogger, DefaultLoggerIsOneProcessWideStdioLogger) {
  ASSERT_NE(DefaultLogger(), nullptr);
  EXPECT_EQ(DefaultLogger(), DefaultLogger());
  EXPECT_NE(dynamic_cast<StdioLogger*>(DefaultLogger()), nullptr);
}

TEST(CapturingLogger, KeepsEveryLineWholeFromManyThreads) {
  CapturingLogger logger;
  constexpr int kThreads = 8, kLines = 400;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&logger, t] {
      for (int i = 0; i < kLines; ++i) {
        logger.Log(i % 2 == 0 ? LogLevel::kInfo : LogLevel::kWarning,
                   absl::StrCat("thread ", t, " line ", i));
      }
    });
  }
  for (std::thread& t : threads) t.join();

  const std::vector<CapturingLogger::Entry> entries = logger.entries();
  ASSERT_EQ(entries.size(), static_cast<size_t>(kThreads * kLines));
  // Each thread's lines arrive whole and in its own order, with their levels.
  std::vector<int> next(kThreads, 0);
  for (const CapturingLogger::Entry& e : entries) {
    int t = -1, i = -1;
    ASSERT_EQ(std::sscanf(e.message.c_str(), "thread %d line %d", &t, &i), 2) << e.message;
    ASSERT_GE(t, 0);
    ASSERT_LT(t, kThreads);
    EXPECT_EQ(i, next[t]++) << e.message;
    EXPECT_EQ(e.message, absl::StrCat("thread ", t, " line ", i));
    EXPECT_EQ(e.level, i % 2 == 0 ? LogLevel::kInfo : LogLevel::kWarning);
  }
  EXPECT_TRUE(logger.Contains("thread 7 line 399"));
  EXPECT_FALSE(logger.Contains("thread 8"));
  EXPECT_EQ(logger.lines().size(), entries.size());
}

}  // namespace
}  // namespace dsmoe
