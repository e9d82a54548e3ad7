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

// Log-probabilities of one generated token, from the model's own distribution: log_softmax of
// the raw logits, before temperature, top-k and top-p (what vLLM reports by default), so they
// do not depend on the sampling parameters and a greedy and a sampled request agree.
struct TopLogprob {
  int32_t token_id = 0;
  float logprob = 0.0f;
};
struct TokenLogprobs {
  int32_t token_id = 0;  // the token sampled
  float logprob = 0.0f;
  std::vector<TopLogprob> top;  // the most likely tokens, most likely first (lowest id on ties)
};

// At most this many alternatives per token (OpenAI's bound on top_logprobs).
inline constexpr int kMaxTopLogprobs = 20;

// Fills `out` for `token` drawn from `logits` [n] with the `num_top` (in [0, kMaxTopLogprobs])
// most likely tokens. The log-sum-exp runs in double, max-subtracted; the top tokens come from a
// partial selection (O(n + num_top log num_top)), not a sort of the vocabulary. Allocation-free
// once `out->top` has grown to num_top. NaN logits count as -inf. REQUIRES: 0 <= token < n.
void ComputeLogprobs(const float* logits, int64_t n, int32_t token, int num_top,
                     TokenLogprobs* out);

}  // namespace dsmoe
