// The command-line flags of a HealthCheckOptions, shared by the servers' mains (CLI11 stays out
// of the libraries).
#pragma once

#include <CLI/CLI.hpp>

#include "core/rpc/health_checker.h"

namespace dsmoe::rpc {

// Adds --health-check-period-ms, --health-check-timeout-ms and --health-check-failures; `what`
// names the targets in the help ("expert servers").
class HealthCheckFlags {
 public:
  HealthCheckFlags(CLI::App& app, const std::string& what) {
    app.add_option("--health-check-period-ms", period_ms_,
                   "Interval between health checks of the " + what)
        ->check(CLI::Range(10, 3600000))
        ->capture_default_str();
    app.add_option("--health-check-timeout-ms", timeout_ms_,
                   "Deadline of one health check (slower counts as failed)")
        ->check(CLI::Range(10, 3600000))
        ->capture_default_str();
    app.add_option("--health-check-failures", failures_,
                   "Failed checks in a row before one of the " + what + " is taken out")
        ->check(CLI::Range(1, 1000))
        ->capture_default_str();
  }
  HealthCheckOptions Options(const std::string& log_prefix, const std::string& target_kind) const {
    HealthCheckOptions o;
    o.period = std::chrono::milliseconds(period_ms_);
    o.timeout = std::chrono::milliseconds(timeout_ms_);
    o.failure_threshold = failures_;
    o.log_prefix = log_prefix;
    o.target_kind = target_kind;
    return o;
  }

 private:
  int period_ms_ = 1000, timeout_ms_ = 2000, failures_ = 2;
};

}  // namespace dsmoe::rpc
