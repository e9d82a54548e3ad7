// The pure part of POST /v1/completions and /v1/chat/completions: a JSON body checked against
// OpenAI's parameters and the gateway's limits, and turned into the dsmoe.v1.GenerateRequest of
// each choice, or into the OpenAI error to answer instead (status, message, parameter). No
// network, no gRPC channel: OpenAiApi calls it, the fuzz target tests/fuzz/http_request_fuzzer.cc
// runs it on any bytes.
//
// What only the gateway's own validation knows (the vocabulary, max_tokens against
// --max-tokens-limit, prompt length) is checked after this, on the GenerateRequest, as for the
// gRPC API.
//
// Thread-safe (a pure function; the tokenizer and chat template are const).
#pragma once

#include <cstdint>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"
#include "dsmoe/v1/gateway.pb.h"
#include "nlohmann/json.hpp"

namespace dsmoe::http {

// What the HTTP API accepts (OpenAiApiOptions' part of it).
struct CompletionLimits {
  std::string model_name;        // the one model served: another "model" is a 404
  int64_t max_context = 0;       // tokens of prompt + completion at most (chat's default length)
  int64_t max_tokens_limit = 0;  // the gateway's bound on max_tokens (chat's default length)
  int max_n = 16;                // choices per request at most (prompts x n)
};

// OpenAI's error body {"error": {"message", "type", "param", "code"}} and its HTTP status.
struct OpenAiError {
  int status = 400;
  std::string message;
  std::string param;  // "" : null
  std::string code;   // "" : null
};

struct CompletionChoice {
  dsmoe::v1::GenerateRequest request;
  std::string echo;  // the prompt text, when echo
  int prompt = 0;    // the prompt it answers (a completions request may list several)
  // echo with logprobs: the prompt's first token (the gateway's prompt_logprobs start at the
  // 2nd), and whether the prompt was text (its echo then leaves out the special tokens the
  // tokenizer added, e.g. BOS, and so do the text offsets of its tokens).
  uint32_t first_prompt_token = 0;
  bool text_prompt = false;
};

// An accepted request: its choices in order (prompt-major, n per prompt), and how to answer.
struct CompletionRequest {
  bool stream = false;
  bool include_usage = false;  // stream_options.include_usage
  bool logprobs = false;
  bool echo_logprobs = false;  // echo with logprobs: the choices' logprobs begin with the prompt
  std::string max_tokens_name = "max_tokens";  // the parameter the client used for it
  std::vector<CompletionChoice> choices;
};

// Either the request or the error; exactly one holds.
struct ParsedCompletion {
  std::optional<OpenAiError> error;
  CompletionRequest request;  // valid when !error
  bool ok() const { return !error.has_value(); }
};

// Parses `body` of a completions (chat false) or chat completions (chat true) request.
// `tokenizer` null: token-id prompts only, no chat, no echo of ids; `chat_template` null: chat
// requests are refused. Never throws. A choice without a "seed" gets a random one.
ParsedCompletion ParseCompletionRequest(std::string_view body, bool chat,
                                        const CompletionLimits& limits, const Tokenizer* tokenizer,
                                        const ChatTemplate* chat_template);

// The request-parsing helpers shared with OpenAiApi's other JSON endpoints (/tokenize,
// /detokenize). Inside the parsing a refusal is thrown as a BadParam; ParseCompletionRequest and
// OpenAiApi::Handle catch it once and answer it.
namespace request_parsing {

using json = nlohmann::json;

// A 400 (or `status`) naming the parameter.
struct BadParam {
  std::string param, message;
  int status = 400;
  std::string code;
};

[[noreturn]] inline void Bad(const std::string& param, const std::string& message) {
  throw BadParam{param, message};
}

// "a string", "an array", ...: a wrong type's name in a message.
std::string TypeName(const json& v);

// Typed access to the request's fields: absent and null are "not given"; a wrong type or a value
// out of range is a 400 naming the field. Holds a reference to `body`.
class Params {
 public:
  explicit Params(const json& body) : body_(body) {}
  bool Has(const char* name) const {
    auto it = body_.find(name);
    return it != body_.end() && !it->is_null();
  }
  const json& Get(const char* name) const { return body_.at(name); }
  std::optional<double> Number(const char* name, double lo, double hi) const;
  std::optional<int64_t> Int(const char* name, int64_t lo, int64_t hi) const;
  std::optional<bool> Bool(const char* name) const;
  std::optional<std::string> String(const char* name) const;

 private:
  const json& body_;
};

// How deep a request body may nest (objects and arrays).
inline constexpr int kMaxJsonDepth = 32;

// The body as a JSON object, or a 400 (not JSON, not an object, nested deeper than
// kMaxJsonDepth).
json ParseBody(std::string_view body);

// A 400 naming the first parameter of `body` not in `known`.
void CheckKnown(const json& body, const std::set<std::string>& known);

}  // namespace request_parsing

}  // namespace dsmoe::http
