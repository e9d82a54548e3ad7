// Where and under which name a dsmoe server serves, identical on every server (gateway,
// attention, expert): the flags defined here once, added by each main, and the two steps every
// main takes with them. Header-only like security_flags.h: CLI11 stays out of the libraries.
//
// When the ready file is written stays each main's choice (at start, once ready, once its
// upstreams were checked), so it is not handled here.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "core/rpc/metrics.h"
#include "core/rpc/server.h"
#include "core/util/status.h"

namespace dsmoe::rpc {

struct ServingFlags {
  std::string listen = "127.0.0.1:0";          // the gRPC address; port 0 picks a free one
  std::string ready_file;                      // "": none
  std::string metrics_listen = "127.0.0.1:0";  // the Prometheus /metrics endpoint; "": none
  std::string model_name;                      // "": the checkpoint directory's name

  // --model-name, or the name of `model_dir` when it was not given.
  std::string ModelName(const std::string& model_dir) const {
    return model_name.empty() ? ModelNameFromPath(model_dir) : model_name;
  }

  // Sets options->address to --listen and, unless --metrics-listen is empty, serves `metrics`
  // there and sets options->metrics_port to the bound port (for the ready file and the log).
  // Call after every instrument of `metrics` is registered, before StartServer.
  absl::Status Apply(MetricsRegistry& metrics, ServerOptions* options) const {
    options->address = listen;
    if (metrics_listen.empty()) return absl::OkStatus();
    DSMOE_ASSIGN_OR_RETURN(options->metrics_port, metrics.Serve(metrics_listen));
    return absl::OkStatus();
  }
};

inline constexpr char kMetricsModelNameHelp[] =
    "The `model` label of the metrics (default: the directory's name)";

// Adds --listen, --ready-file, --metrics-listen and --model-name; `model_name_help` says what the
// name is used for on this server.
inline void AddServingFlags(CLI::App& app, ServingFlags* flags,
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
