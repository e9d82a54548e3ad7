// Picks the next token from logits: greedy at temperature 0, otherwise temperature, then top-k,
// then top-p (nucleus) filtering — the order vLLM and HF apply them — and a draw from a
// seeded generator, so a (seed, request) pair always gives the same text.
#pragma once

#include <cstdint>
#include <random>
#include <vector>

#include "core/util/status.h"

namespace dsmoe {

struct SamplingParams {
  double temperature = 0.0;  // 0: greedy (arg-max, lowest id on ties)
  int64_t top_k = 0;         // 0: no limit
  double top_p = 1.0;        // in (0, 1]
  uint64_t seed = 0;

  absl::Status Validate() const;
};

// Thread-compatible. Holds the random state; the scratch of a draw is per thread.
class Sampler {
 public:
  Sampler(int64_t vocab_size, const SamplingParams& params);
  int32_t Sample(const float* logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
  int64_t vocab_size_;
};

int32_t ArgMax(const float* logits, int64_t n);

}  // namespace dsmoe
