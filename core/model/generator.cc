#include "core/model/generator.h"

#include <algorithm>
#include <chrono>

namespace dsmoe {

const char* FinishReasonName(FinishReason r) {
  return r == FinishReason::kStop ? "stop" : "length";
}

absl::StatusOr<GenerateResult> Generate(ModelRunner& runner, const GenerationConfig& generation,
                                        const GenerateRequest& request, int32_t slot,
                                        const std::function<void(int32_t)>& on_token) {
  using Clock = std::chrono::steady_clock;
  const int64_t P = static_cast<int64_t>(request.prompt.size());
  const int64_t max_context = runner.options().max_context;
  const int64_t V = runner.config().vocab_size;
  if (P == 0) return absl::InvalidArgumentError("the prompt is empty");
  if (P >= max_context) {
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", P, " tokens leaves no room in the context of ", max_context, " tokens"));
  }
  if (request.max_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be > 0, got ", request.max_tokens));
  }
  DSMOE_RETURN_IF_ERROR(request.sampling.Validate());
  if (request.top_logprobs < 0 || request.top_logprobs > kMaxTopLogprobs) {
    return absl::InvalidArgumentError(absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs,
                                                   "], got ", request.top_logprobs));
  }
  std::vector<int32_t> stop_ids = request.stop_token_ids;
  if (!request.ignore_eos) {
    for (int64_t id : generation.eos_token_ids) stop_ids.push_back(static_cast<int32_t>(id));
  }

  GenerateResult result;
  result.output_ids.reserve(request.max_tokens);
  std::vector<float> logits(V);
  const int64_t chunk = runner.options().max_batch_tokens;
  std::vector<int32_t> slots(chunk, slot), positions(chunk);

  // Prefill: logits only for the prompt's last token.
  const auto t0 = Clock::now();
  for (int64_t begin = 0; begin < P; begin += chunk) {
    const int64_t n = std::min(chunk, P - begin);
    for (int64_t i = 0; i < n; ++i) positions[i] = static_cast<int32_t>(begin + i);
    const int32_t last = static_cast<int32_t>(n - 1);
    const bool final_chunk = begin + n == P;
    ForwardBatch batch{
        std::span(request.prompt).subspan(begin, n), std::span(slots).first(n),
        std::span(positions).first(n),
        final_chunk ? std::span<const int32_t>(&last, 1) : std::span<const int32_t>()};
    DSMOE_RETURN_IF_ERROR(runner.Forward(batch, logits.data()));
  }
  const auto t1 = Clock::now();
  result.prefill_seconds = std::chrono::duration<double>(t1 - t0).count();

  Sampler sampler(V, request.sampling);
  // Log-probabilities of the token just sampled, from the same logits.
  auto sample = [&] {
    const int32_t t = sampler.Sample(logits.data());
    if (request.logprobs) {
      ComputeLogprobs(logits.data(), V, t, request.top_logprobs, &result.logprobs.emplace_back());
    }
    return t;
  };
  int32_t token = sample();
  const int32_t zero = 0;
  for (int64_t pos = P;; ++pos) {
    result.output_ids.push_back(token);
    if (on_token) on_token(token);
    if (std::find(stop_ids.begin(), stop_ids.end(), token) != stop_ids.end()) {
      result.finish_reason = FinishReason::kStop;
      break;
    }
    if (static_cast<int64_t>(result.output_ids.size()) >= request.max_tokens ||
        pos + 1 >= max_context) {
      result.finish_reason = FinishReason::kLength;
      break;
    }
    const int32_t position = static_cast<int32_t>(pos);
    ForwardBatch step{std::span<const int32_t>(&token, 1), std::span<const int32_t>(&slot, 1),
                      std::span<const int32_t>(&position, 1), std::span<const int32_t>(&zero, 1)};
    DSMOE_RETURN_IF_ERROR(runner.Forward(step, logits.data()));
    token = sample();
  }
  result.decode_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return result;
}

}  // namespace dsmoe
