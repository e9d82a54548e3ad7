#include "gateway/request_validation.h"

#include <cmath>

namespace dsmoe {

namespace {

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

}  // namespace

absl::Status ValidateTokenIds(const google::protobuf::RepeatedField<uint32_t>& ids,
                              int64_t vocab_size, absl::string_view field) {
  for (int i = 0; i < ids.size(); ++i) {
    if (ids[i] >= vocab_size) {
      return Invalid(absl::StrCat(field, "[", i, "] = ", ids[i], " is outside the vocabulary [0, ",
                                  vocab_size, ")"));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateGenerateRequest(const dsmoe::v1::GenerateRequest& r,
                                     const RequestLimits& limits, const Tokenizer* tokenizer,
                                     internal::v1::AttentionGenerateRequest* up) {
  if (!r.model().empty() && r.model() != limits.model_name) {
    return absl::NotFoundError(absl::StrCat("model '", r.model(), "' is not served here (serving '",
                                            limits.model_name, "')"));
  }
  google::protobuf::RepeatedField<uint32_t> ids;
  switch (r.prompt_case()) {
    case dsmoe::v1::GenerateRequest::kText: {
      // An empty text is an empty prompt, as empty token_ids are: refused the same way, before
      // a tokenizer could turn it into a lone BOS.
      if (r.text().empty()) return Invalid("the prompt is empty");
      if (tokenizer == nullptr)
        return Invalid("text prompts need a tokenizer and this model has none; send token_ids");
      auto encoded = tokenizer->Encode(r.text(), /*add_special_tokens=*/true);
      if (!encoded.ok()) return Invalid(absl::StrCat("prompt text: ", encoded.status().message()));
      ids.Add(encoded->begin(), encoded->end());
      break;
    }
    case dsmoe::v1::GenerateRequest::PROMPT_NOT_SET:
      return Invalid("a prompt is required: set text or token_ids");
    case dsmoe::v1::GenerateRequest::kTokenIds:
      ids = r.token_ids().ids();
      break;
  }
  if (ids.empty()) return Invalid("the prompt is empty");
  if (ids.size() > limits.max_prompt_tokens) {
    return Invalid(absl::StrCat("prompt of ", ids.size(), " tokens exceeds the limit of ",
                                limits.max_prompt_tokens));
  }
  DSMOE_RETURN_IF_ERROR(ValidateTokenIds(ids, limits.vocab_size, "token_ids"));
  const int64_t max_tokens = r.has_max_tokens() ? r.max_tokens() : 16;
  if (max_tokens < 1 || max_tokens > limits.max_tokens_limit) {
    return Invalid(
        absl::StrCat("max_tokens must be in [1, ", limits.max_tokens_limit, "], got ", max_tokens));
  }
  const float temperature = r.has_temperature() ? r.temperature() : 1.0f;
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return Invalid(absl::StrCat("temperature must be >= 0, got ", temperature));
  }
  const float top_p = r.has_top_p() ? r.top_p() : 1.0f;
  if (!(top_p > 0.0f && top_p <= 1.0f))
    return Invalid(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  if (r.stop_size() > 0 && tokenizer == nullptr) {
    return Invalid("stop strings need a tokenizer and this model has none; use stop_token_ids");
  }
  for (const std::string& stop : r.stop()) {
    if (stop.empty()) return Invalid("stop strings must not be empty");
  }
  DSMOE_RETURN_IF_ERROR(ValidateTokenIds(r.stop_token_ids(), limits.vocab_size, "stop_token_ids"));
  *up->mutable_prompt_token_ids() = std::move(ids);
  up->set_max_tokens(static_cast<uint32_t>(max_tokens));
  up->set_temperature(temperature);
  up->set_top_k(r.top_k());
  up->set_top_p(top_p);
  up->set_seed(r.seed());
  up->mutable_stop_token_ids()->CopyFrom(r.stop_token_ids());
  up->set_ignore_eos(r.ignore_eos());
  return absl::OkStatus();
}

}  // namespace dsmoe
