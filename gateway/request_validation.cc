#include "gateway/request_validation.h"

#include <cmath>

#include "core/model/sampler.h"

namespace dsmoe {

namespace {

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

absl::Status CheckUtf8(absl::string_view field, absl::string_view bytes) {
  const size_t bad = FirstInvalidUtf8(bytes);
  if (bad == absl::string_view::npos) return absl::OkStatus();
  return Invalid(absl::StrCat(field, " is not valid UTF-8 (byte ", bad, ")"));
}

absl::Status NotA(absl::string_view message_name) {
  return Invalid(absl::StrCat("the request is not a ", message_name, " (malformed protobuf)"));
}

}  // namespace

size_t FirstInvalidUtf8(absl::string_view s) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned char c = b[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    // The sequence's length and the range of its second byte (RFC 3629, section 4); later
    // bytes are 80..BF.
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) {
      len = 2;
    } else if (c >= 0xE0 && c <= 0xEF) {
      len = 3;
      if (c == 0xE0) lo = 0xA0;  // overlong below U+0800
      if (c == 0xED) hi = 0x9F;  // surrogates U+D800..DFFF
    } else if (c >= 0xF0 && c <= 0xF4) {
      len = 4;
      if (c == 0xF0) lo = 0x90;  // overlong below U+10000
      if (c == 0xF4) hi = 0x8F;  // above U+10FFFF
    } else {
      return i;  // a continuation byte, C0/C1 (overlong) or F5..FF
    }
    if (i + len > n || b[i + 1] < lo || b[i + 1] > hi) return i;
    for (size_t k = 2; k < len; ++k) {
      if (b[i + k] < 0x80 || b[i + k] > 0xBF) return i;
    }
    i += len;
  }
  return absl::string_view::npos;
}

absl::Status ParseGenerateRequest(absl::string_view wire, dsmoe::v1::GenerateRequest* request) {
  dsmoe::v1::wire::GenerateRequestStrings strings;
  if (!strings.ParseFromArray(wire.data(), static_cast<int>(wire.size()))) {
    return NotA("dsmoe.v1.GenerateRequest");
  }
  DSMOE_RETURN_IF_ERROR(CheckUtf8("text", strings.text()));
  for (int i = 0; i < strings.stop_size(); ++i) {
    DSMOE_RETURN_IF_ERROR(CheckUtf8(absl::StrCat("stop[", i, "]"), strings.stop(i)));
  }
  DSMOE_RETURN_IF_ERROR(CheckUtf8("model", strings.model()));
  if (!request->ParseFromArray(wire.data(), static_cast<int>(wire.size()))) {
    return NotA("dsmoe.v1.GenerateRequest");
  }
  return absl::OkStatus();
}

absl::Status ParseTokenizeRequest(absl::string_view wire, dsmoe::v1::TokenizeRequest* request) {
  dsmoe::v1::wire::TokenizeRequestStrings strings;
  if (!strings.ParseFromArray(wire.data(), static_cast<int>(wire.size()))) {
    return NotA("dsmoe.v1.TokenizeRequest");
  }
  DSMOE_RETURN_IF_ERROR(CheckUtf8("text", strings.text()));
  if (!request->ParseFromArray(wire.data(), static_cast<int>(wire.size()))) {
    return NotA("dsmoe.v1.TokenizeRequest");
  }
  return absl::OkStatus();
}

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
  // 0: only the prompt's logprobs are wanted (what scoring a text needs).
  if (max_tokens == 0 && !r.has_prompt_logprobs()) {
    return Invalid(absl::StrCat("max_tokens must be in [1, ", limits.max_tokens_limit,
                                "], got 0 (0 is allowed only with prompt_logprobs)"));
  }
  if (max_tokens < 0 || max_tokens > limits.max_tokens_limit) {
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
  if (r.top_logprobs() < 0 || r.top_logprobs() > kMaxTopLogprobs) {
    return Invalid(
        absl::StrCat("top_logprobs must be in [0, ", kMaxTopLogprobs, "], got ", r.top_logprobs()));
  }
  if (r.top_logprobs() > 0 && !r.logprobs())
    return Invalid("top_logprobs needs logprobs to be set");
  if (r.has_prompt_logprobs() &&
      (r.prompt_logprobs() < 0 || r.prompt_logprobs() > kMaxTopLogprobs)) {
    return Invalid(absl::StrCat("prompt_logprobs must be in [0, ", kMaxTopLogprobs, "], got ",
                                r.prompt_logprobs()));
  }
  *up->mutable_prompt_token_ids() = std::move(ids);
  up->set_max_tokens(static_cast<uint32_t>(max_tokens));
  up->set_temperature(temperature);
  up->set_top_k(r.top_k());
  up->set_top_p(top_p);
  up->set_seed(r.seed());
  up->mutable_stop_token_ids()->CopyFrom(r.stop_token_ids());
  up->set_ignore_eos(r.ignore_eos());
  up->set_logprobs(r.logprobs());
  up->set_top_logprobs(r.top_logprobs());
  if (r.has_prompt_logprobs()) up->set_prompt_logprobs(r.prompt_logprobs());
  return absl::OkStatus();
}

}  // namespace dsmoe
