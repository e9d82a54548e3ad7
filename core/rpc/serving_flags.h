// Where and under which name a dsmoe server serves, identical on every server (gateway,
// attention, expert): the flags of a ServingOptions (serving_options.h), defined here once and
// added by each main. Header-only like security_flags.h: CLI11 stays out of the libraries.
//
// When the ready file is written stays each main's choice (at start, once ready, once its
// upstreams were checked), so it is not handled here.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/rpc/serving_options.h"

namespace dsmoe::rpc {

// The flags fill a ServingOptions (serving_options.h); the old name stays for the mains that
// still use it.
using ServingFlags = ServingOptions;

inline constexpr char kMetricsModelNameHelp[] =
    "The `model` label of the metrics (default: the directory's name)";

// Adds --listen, --ready-file, --metrics-listen and --model-name; `model_name_help` says what the
// name is used for on this server.
inline void AddServingFlags(CLI::App& app, ServingOptions* flags,
                            const std::string& model_name_help = kMetricsModelNameHelp) {
  app.add_option("--listen", flags->listen, "Address to serve on")->capture_default_str();
  app.add_option("--ready-file", flags->ready_file,
                 "Write the bound port (and the metrics port) here once serving");
  app.add_option("--metrics-listen", flags->metrics_listen,
                 "Address of the Prometheus /metrics endpoint (empty: none)")
      ->capture_default_str();
  app.add_option("--model-name", flags->model_name, model_name_help);
}

}  // namespace dsmoe::rpc
