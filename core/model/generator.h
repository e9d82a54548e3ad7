// Autoregressive generation for one sequence on a ModelRunner: the prompt is prefilled in
// chunks of the runner's batch size, then one token per step reuses the KV cache.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/model/config.h"
#include "core/model/model_runner.h"
#include "core/model/sampler.h"
#include "core/util/status.h"

namespace dsmoe {

struct GenerateRequest {
  std::vector<int32_t> prompt;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<int32_t> stop_token_ids;  // in addition to the model's eos ids
  bool ignore_eos = false;
  bool logprobs = false;  // fill GenerateResult.logprobs (sampler.h: ComputeLogprobs)
  int top_logprobs = 0;   // alternatives per token, in [0, kMaxTopLogprobs]
};

enum class FinishReason { kStop, kLength };
const char* FinishReasonName(FinishReason r);

struct GenerateResult {
  std::vector<int32_t> output_ids;
  std::vector<TokenLogprobs> logprobs;  // one per output id, when the request asked
  FinishReason finish_reason = FinishReason::kLength;
  double prefill_seconds = 0.0;
  double decode_seconds = 0.0;  // all steps after the first token
};

// Runs on KV-cache slot `slot` of `runner`, overwriting it. `on_token` (optional) sees every
// generated id as it is produced.
absl::StatusOr<GenerateResult> Generate(ModelRunner& runner, const GenerationConfig& generation,
                                        const GenerateRequest& request, int32_t slot = 0,
                                        const std::function<void(int32_t)>& on_token = {});

}  // namespace dsmoe
