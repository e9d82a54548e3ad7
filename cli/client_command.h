// `dsmoe client generate`: calls a dsmoe gateway and streams the answer.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cli/sampling_options.h"

namespace dsmoe::cli {

struct ClientGenerateOptions {
  std::string gateway;    // host:port; empty: the one in the cluster state
  std::string state_dir;  // a `cluster up` state dir: gateway, CA, client certificate, API key
  // Security: TLS with this CA (empty: the state's, else the system roots), an optional client
  // certificate, and the API key sent as `authorization: Bearer`. Explicit flags win over the
  // state; the key also comes from $DSMOE_API_KEY.
  std::string ca, cert, key, server_name;
  std::string api_key, api_key_file;
  bool insecure = false;
  std::string ids;     // comma-separated, or
  std::string prompt;  // text (the gateway tokenizes)
  SamplingOptions sampling;
  std::vector<std::string> stop;  // stop strings (the gateway needs a tokenizer)
  int prompt_logprobs = -1;       // >= 0: the prompt tokens' logprobs, with this many alternatives
  bool json = false;
  double timeout_seconds = 600;
};

int RunClientGenerate(const ClientGenerateOptions& o);

}  // namespace dsmoe::cli
