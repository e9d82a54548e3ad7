// Fuzz target: the gateway's request validation (gateway/request_validation.h) on any bytes
// parsed as a dsmoe.v1.GenerateRequest, with and without a tokenizer. A refused request gets
// INVALID_ARGUMENT or NOT_FOUND with a message; an accepted one must be something an attention
// server can run: a non-empty prompt within the limits and the vocabulary, max_tokens within
// its bound (0 only with the prompt's logprobs, 0-20 of them), finite non-negative temperature,
// top_p in (0, 1], stop ids in the vocabulary.
#include <cmath>
#include <cstdint>
#include <memory>

#include "core/tokenizer/tokenizer.h"
#include "gateway/request_validation.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/fuzz_tokenizer.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  dsmoe::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;
  const dsmoe::RequestLimits limits{"tiny", /*vocab_size=*/512, /*max_prompt_tokens=*/64,
                                    /*max_tokens_limit=*/100};
  for (const dsmoe::Tokenizer* tokenizer :
       {dsmoe::fuzz::DeepSeekTokenizer(), (const dsmoe::Tokenizer*)nullptr}) {
    dsmoe::internal::v1::AttentionGenerateRequest up;
    const absl::Status s = dsmoe::ValidateGenerateRequest(request, limits, tokenizer, &up);
    if (!s.ok()) {
      DSMOE_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument ||
                       s.code() == absl::StatusCode::kNotFound);
      DSMOE_FUZZ_CHECK(!s.message().empty());
      continue;
    }
    DSMOE_FUZZ_CHECK(up.prompt_token_ids_size() >= 1 &&
                     up.prompt_token_ids_size() <= limits.max_prompt_tokens);
    for (uint32_t id : up.prompt_token_ids()) DSMOE_FUZZ_CHECK(id < limits.vocab_size);
    for (uint32_t id : up.stop_token_ids()) DSMOE_FUZZ_CHECK(id < limits.vocab_size);
    // 0 only with the prompt's logprobs (then they are the whole answer), at most 20 of them.
    DSMOE_FUZZ_CHECK((up.max_tokens() >= 1 || up.has_prompt_logprobs()) &&
                     up.max_tokens() <= limits.max_tokens_limit);
    DSMOE_FUZZ_CHECK(!up.has_prompt_logprobs() ||
                     (up.prompt_logprobs() >= 0 && up.prompt_logprobs() <= 20));
    DSMOE_FUZZ_CHECK(std::isfinite(up.temperature()) && up.temperature() >= 0);
    DSMOE_FUZZ_CHECK(up.top_p() > 0 && up.top_p() <= 1);
    DSMOE_FUZZ_CHECK(request.model().empty() || request.model() == limits.model_name);
  }
  return 0;
}
