// The sampling and stopping options that `dsmoe generate` (in process) and `dsmoe client
// generate` (through a gateway) share: one struct, one set of flags (cli/flags.h), so the two
// commands cannot drift apart.
#pragma once

#include <cstdint>
#include <string>

namespace dsmoe::cli {

struct SamplingOptions {
  // No checkpoint this tool serves has a context past 2^20 positions; a larger count is a typo,
  // refused at parse time (the server checks the model's real context again).
  static constexpr int64_t kMaxTokensLimit = int64_t{1} << 20;

  int64_t max_tokens = 16;
  double temperature = 0.0;  // 0: greedy
  int64_t top_k = 0;         // 0: all tokens
  double top_p = 1.0;
  uint64_t seed = 0;
  std::string stop_ids;  // extra stop token ids, "1,2,3"
  bool ignore_eos = false;
  // With --json: each token's log-probability and this many alternatives (0..20); -1: none.
  int logprobs = -1;
};

}  // namespace dsmoe::cli
