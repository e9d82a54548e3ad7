// Where and under which name a dsmoe server serves, the same on every server (gateway,
// attention, expert): one struct in each server's Options, filled from the flags of
// serving_flags.h by the mains, or directly by tests that run servers in one process.
#pragma once

#include <string>

#include "core/rpc/metrics.h"
#include "core/rpc/server.h"
#include "core/util/status.h"

namespace dsmoe::rpc {

struct ServingOptions {
  std::string listen = "127.0.0.1:0";          // the gRPC address; port 0 picks a free one
  std::string ready_file;                      // "": none
  std::string metrics_listen = "127.0.0.1:0";  // the Prometheus /metrics endpoint; "": none
  std::string model_name;                      // "": the checkpoint directory's name

  // --model-name, or the name of `model_dir` when it was not given.
  std::string ModelName(const std::string& model_dir) const {
    return model_name.empty() ? ModelNameFromPath(model_dir) : model_name;
  }

  // Sets options->address to `listen` and, unless metrics_listen is empty, serves `metrics`
  // there and sets options->metrics_port to the bound port (for the ready file and the log).
  // Call after every instrument of `metrics` is registered, before StartServer.
  absl::Status Apply(MetricsRegistry& metrics, ServerOptions* options) const {
    options->address = listen;
    if (metrics_listen.empty()) return absl::OkStatus();
    DSMOE_ASSIGN_OR_RETURN(options->metrics_port, metrics.Serve(metrics_listen));
    return absl::OkStatus();
  }
};

}  // namespace dsmoe::rpc
