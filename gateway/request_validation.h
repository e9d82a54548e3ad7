// The gateway's check of a public GenerateRequest, as a pure function of the request, the
// limits and the tokenizer: a bad request gets INVALID_ARGUMENT (or NOT_FOUND for another
// model) naming the field, a good one becomes the attention server's request. No I/O, so the
// fuzz target tests/fuzz/request_fuzzer.cc calls it directly.
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/string_view.h"
#include "core/tokenizer/tokenizer.h"
#include "core/util/status.h"
#include "dsmoe/internal/v1/attention.pb.h"
#include "dsmoe/v1/gateway.pb.h"
#include "dsmoe/v1/gateway_wire.pb.h"

namespace dsmoe {

// The offset of the first byte of `bytes` that does not start a well-formed UTF-8 sequence
// (RFC 3629 section 4: no overlong forms, no surrogates, nothing above U+10FFFF, no truncated
// sequence), or npos when all of it is valid.
size_t FirstInvalidUtf8(absl::string_view bytes);

// A GenerateRequest (Generate, Complete) or TokenizeRequest from the bytes a client sent: first
// each string field is checked to be UTF-8 (INVALID_ARGUMENT "<field> is not valid UTF-8 (byte
// <offset>)", e.g. "stop[1] is not valid UTF-8 (byte 2)"), then the message is parsed
// (INVALID_ARGUMENT if it is not one). Protobuf alone would refuse such a request without
// saying why (proto/dsmoe/v1/gateway_wire.proto).
absl::Status ParseGenerateRequest(absl::string_view wire, dsmoe::v1::GenerateRequest* request);
absl::Status ParseTokenizeRequest(absl::string_view wire, dsmoe::v1::TokenizeRequest* request);

struct RequestLimits {
  std::string model_name;         // what GenerateRequest.model may say (empty also accepted)
  int64_t vocab_size = 0;         // token ids must be below this
  int64_t max_prompt_tokens = 0;  // prompt length bound (after tokenizing)
  int64_t max_tokens_limit = 0;   // bound on max_tokens
};

// Every id below vocab_size, else INVALID_ARGUMENT "<field>[i] = <id> is outside the vocabulary
// [0, <vocab_size>)" (prompts, stop token ids, Detokenize: one check, one message).
absl::Status ValidateTokenIds(const google::protobuf::RepeatedField<uint32_t>& ids,
                              int64_t vocab_size, absl::string_view field);

// `tokenizer` may be null: then only token-id prompts are accepted. On success `upstream`
// holds the prompt ids and the sampling parameters with their defaults filled in.
absl::Status ValidateGenerateRequest(const dsmoe::v1::GenerateRequest& request,
                                     const RequestLimits& limits, const Tokenizer* tokenizer,
                                     internal::v1::AttentionGenerateRequest* upstream);

}  // namespace dsmoe
