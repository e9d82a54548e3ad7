// Fuzz target: the HTTP API's request parsing (gateway/http/completion_request.h) on any bytes
// as the body of POST /v1/completions and /v1/chat/completions, with a tokenizer and the
// deepseek-moe chat template and without them. Then each accepted choice goes through the
// gateway's own validation (gateway/request_validation.h), as a request does in the gateway.
//
// Beyond not crashing: a refusal is a 4xx with a message; an accepted request has 1..max_n
// choices, each for the served model, with max_tokens in [1, 2^31) when set (chat always sets
// it; 0 only for an echo asking the prompt's logprobs), a finite non-negative temperature, top_p
// in (0, 1],
// top_logprobs in [0, 20] and only with logprobs, and a prompt (text or ids). A choice the
// gateway's validation accepts as well has a non-empty prompt within the limits.
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>

#include "core/model/sampler.h"
#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"
#include "gateway/http/completion_request.h"
#include "gateway/request_validation.h"
#include "tests/fuzz/fuzz_check.h"
#include "tests/fuzz/fuzz_tokenizer.h"

namespace {

// deepseek-ai/deepseek-moe-16b-chat's chat template, the one make-model writes.
const dsmoe::ChatTemplate* SharedTemplate() {
  static const dsmoe::ChatTemplate* t = [] {
    auto parsed = dsmoe::ChatTemplate::Parse(*dsmoe::BuiltinChatTemplate("deepseek-moe"),
                                             {{"bos_token", "<s>"}, {"eos_token", "</s>"}});
    if (!parsed.ok()) std::abort();
    return parsed->release();
  }();
  return t;
}

void Check(std::string_view body, bool chat, const dsmoe::Tokenizer* tokenizer,
           const dsmoe::ChatTemplate* chat_template) {
  const dsmoe::http::CompletionLimits limits{"tiny", /*max_context=*/128,
                                             /*max_tokens_limit=*/100, /*max_n=*/4};
  const dsmoe::http::ParsedCompletion parsed =
      dsmoe::http::ParseCompletionRequest(body, chat, limits, tokenizer, chat_template);
  if (!parsed.ok()) {
    const dsmoe::http::OpenAiError& e = *parsed.error;
    DSMOE_FUZZ_CHECK(e.status >= 400 && e.status < 500);
    DSMOE_FUZZ_CHECK(!e.message.empty());
    DSMOE_FUZZ_CHECK(parsed.request.choices.empty());
    return;
  }
  const dsmoe::http::CompletionRequest& r = parsed.request;
  DSMOE_FUZZ_CHECK(!r.choices.empty() && r.choices.size() <= static_cast<size_t>(limits.max_n));
  DSMOE_FUZZ_CHECK(!chat || (tokenizer != nullptr && chat_template != nullptr));
  DSMOE_FUZZ_CHECK(!r.include_usage || r.stream);
  DSMOE_FUZZ_CHECK(r.max_tokens_name == "max_tokens" ||
                   (chat && r.max_tokens_name == "max_completion_tokens"));
  const dsmoe::RequestLimits validation{limits.model_name, /*vocab_size=*/512,
                                        /*max_prompt_tokens=*/64, limits.max_tokens_limit};
  for (const dsmoe::http::CompletionChoice& c : r.choices) {
    const dsmoe::v1::GenerateRequest& g = c.request;
    DSMOE_FUZZ_CHECK(g.model() == limits.model_name);
    DSMOE_FUZZ_CHECK(g.has_text() || g.has_token_ids());
    DSMOE_FUZZ_CHECK(!chat || g.has_token_ids());
    DSMOE_FUZZ_CHECK(g.has_text() || tokenizer != nullptr || c.echo.empty());
    if (chat) {
      // Given, or filled in from the context and the gateway's bound: never 0.
      DSMOE_FUZZ_CHECK(g.max_tokens() >= 1 && g.max_tokens() <= INT32_MAX);
    } else {
      DSMOE_FUZZ_CHECK(g.max_tokens() <= INT32_MAX);  // 0: the gateway's default
    }
    DSMOE_FUZZ_CHECK(std::isfinite(g.temperature()) && g.temperature() >= 0);
    DSMOE_FUZZ_CHECK(!g.has_top_p() || (g.top_p() > 0 && g.top_p() <= 1));
    DSMOE_FUZZ_CHECK(g.top_logprobs() >= 0 && g.top_logprobs() <= dsmoe::kMaxTopLogprobs);
    DSMOE_FUZZ_CHECK(g.top_logprobs() == 0 || g.logprobs());
    DSMOE_FUZZ_CHECK(g.logprobs() == r.logprobs);
    for (const std::string& s : g.stop()) DSMOE_FUZZ_CHECK(!s.empty());
    DSMOE_FUZZ_CHECK(c.prompt >= 0 && static_cast<size_t>(c.prompt) < r.choices.size());

    dsmoe::internal::v1::AttentionGenerateRequest up;
    const absl::Status s = dsmoe::ValidateGenerateRequest(g, validation, tokenizer, &up);
    if (!s.ok()) {
      DSMOE_FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument);
      DSMOE_FUZZ_CHECK(!s.message().empty());
      continue;
    }
    DSMOE_FUZZ_CHECK(up.prompt_token_ids_size() >= 1 &&
                     up.prompt_token_ids_size() <= validation.max_prompt_tokens);
    // 0 only for an echo that asks the prompt's logprobs (then they are the whole answer).
    DSMOE_FUZZ_CHECK((up.max_tokens() >= 1 || (!chat && up.has_prompt_logprobs())) &&
                     up.max_tokens() <= validation.max_tokens_limit);
    DSMOE_FUZZ_CHECK(!up.has_prompt_logprobs() ||
                     (up.prompt_logprobs() >= 0 && up.prompt_logprobs() <= dsmoe::kMaxTopLogprobs));
    DSMOE_FUZZ_CHECK(std::isfinite(up.temperature()) && up.temperature() >= 0);
    DSMOE_FUZZ_CHECK(up.top_p() > 0 && up.top_p() <= 1);
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 64 << 10) return 0;
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  for (bool chat : {false, true}) {
    Check(body, chat, dsmoe::fuzz::DeepSeekTokenizer(), SharedTemplate());
    Check(body, chat, nullptr, nullptr);
  }
  return 0;
}
