#include "gateway/http/completion_request.h"

#include <algorithm>
#include <random>

#include "absl/strings/str_cat.h"
#include "core/model/sampler.h"

namespace dsmoe::http {

using json = nlohmann::json;

namespace request_parsing {

std::string TypeName(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "a number";
  }
}

std::optional<double> Params::Number(const char* name, double lo, double hi) const {
  if (!Has(name)) return std::nullopt;
  const json& v = Get(name);
  if (!v.is_number()) Bad(name, absl::StrCat("'", name, "' must be a number, got ", TypeName(v)));
  const double x = v.get<double>();
  if (!(x >= lo && x <= hi)) {
    Bad(name, absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "], got ", x));
  }
  return x;
}

std::optional<int64_t> Params::Int(const char* name, int64_t lo, int64_t hi) const {
  if (!Has(name)) return std::nullopt;
  const json& v = Get(name);
  if (!v.is_number_integer()) {
    Bad(name, absl::StrCat("'", name, "' must be an integer, got ", TypeName(v)));
  }
  if (v.is_number_unsigned() && v.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)) {
    Bad(name, absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "]"));
  }
  const int64_t x = v.get<int64_t>();
  if (x < lo || x > hi) {
    Bad(name, absl::StrCat("'", name, "' must be in [", lo, ", ", hi, "], got ", x));
  }
  return x;
}

std::optional<bool> Params::Bool(const char* name) const {
  if (!Has(name)) return std::nullopt;
  const json& v = Get(name);
  if (!v.is_boolean()) Bad(name, absl::StrCat("'", name, "' must be a boolean, got ", TypeName(v)));
  return v.get<bool>();
}

std::optional<std::string> Params::String(const char* name) const {
  if (!Has(name)) return std::nullopt;
  const json& v = Get(name);
  if (!v.is_string()) Bad(name, absl::StrCat("'", name, "' must be a string, got ", TypeName(v)));
  return v.get<std::string>();
}

json ParseBody(std::string_view body) {
  // nlohmann's parser and destructor are iterative, but copying a value, comparing it or
  // rendering it in a chat template recurses: a 4 MiB body of '[' would overflow the stack
  // (tests/fuzz/corpus/http_request/deep_message). No OpenAI request nests deeper than ~6.
  bool too_deep = false;
  json j = json::parse(
      body,
      [&too_deep](int depth, json::parse_event_t, json&) {
        if (depth > kMaxJsonDepth) too_deep = true;
        return !too_deep;  // past the limit nothing more is kept
      },
      /*allow_exceptions=*/false);
  if (too_deep) {
    Bad("", absl::StrCat("the request body nests deeper than ", kMaxJsonDepth, " levels"));
  }
  if (j.is_discarded()) Bad("", "the request body is not valid JSON");
  if (!j.is_object()) Bad("", "the request body must be a JSON object");
  return j;
}

void CheckKnown(const json& body, const std::set<std::string>& known) {
  for (const auto& [name, value] : body.items()) {
    if (known.count(name) == 0) Bad(name, absl::StrCat("unknown parameter '", name, "'"));
  }
}

}  // namespace request_parsing

namespace {

using request_parsing::Bad;
using request_parsing::BadParam;
using request_parsing::CheckKnown;
using request_parsing::Params;
using request_parsing::ParseBody;

uint64_t RandomSeed() {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

// A chat message's content as text: a string, null, or a list of {"type": "text", "text"}.
std::string ContentText(const json& content, size_t i) {
  const std::string param = absl::StrCat("messages[", i, "].content");
  if (content.is_null()) return "";
  if (content.is_string()) return content.get<std::string>();
  if (!content.is_array()) Bad(param, "'" + param + "' must be a string or a list of parts");
  std::string text;
  for (const json& part : content) {
    if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
        !part["text"].is_string()) {
      Bad(param, "only text content parts ({\"type\": \"text\", \"text\": ...}) are supported");
    }
    text += part["text"].get<std::string>();
  }
  return text;
}

// Parameters OpenAI defines that dsmoe does not implement: accepted only at their neutral value.
void CheckNeutral(const Params& p, const json& body) {
  for (const char* name : {"presence_penalty", "frequency_penalty"}) {
    if (auto v = p.Number(name, -2, 2); v && *v != 0) {
      Bad(name, absl::StrCat("'", name, "' is not supported (only 0)"));
    }
  }
  if (p.Has("logit_bias")) {
    const json& v = body["logit_bias"];
    if (!v.is_object() || !v.empty()) Bad("logit_bias", "'logit_bias' is not supported");
  }
}

// Throws BadParam for a request to refuse (the caller catches it).
void Parse(std::string_view body_text, bool chat, const CompletionLimits& limits,
           const Tokenizer* tokenizer, const ChatTemplate* chat_template, CompletionRequest& out) {
  const json body = ParseBody(body_text);
  static const std::set<std::string> kCommon = {"model",
                                                "max_tokens",
                                                "temperature",
                                                "top_p",
                                                "top_k",
                                                "seed",
                                                "stop",
                                                "n",
                                                "stream",
                                                "stream_options",
                                                "user",
                                                "stop_token_ids",
                                                "ignore_eos",
                                                "presence_penalty",
                                                "frequency_penalty",
                                                "logit_bias",
                                                "logprobs"};
  std::set<std::string> known = kCommon;
  if (chat) {
    for (const char* k : {"messages", "max_completion_tokens", "top_logprobs", "response_format",
                          "add_generation_prompt"})
      known.insert(k);
  } else {
    for (const char* k : {"prompt", "echo", "best_of"}) known.insert(k);
  }
  CheckKnown(body, known);
  const Params p(body);
  CheckNeutral(p, body);
  if (auto model = p.String("model"); model && *model != limits.model_name) {
    throw BadParam{
        "model",
        absl::StrCat("the model '", *model, "' does not exist (serving '", limits.model_name, "')"),
        404, "model_not_found"};
  }
  // Logprobs: chat's logprobs (bool) + top_logprobs, completions' logprobs (the number of
  // alternatives). Either way at most 20 alternatives, as the attention server computes.
  bool logprobs = false;
  int64_t top_logprobs = 0;
  if (chat) {
    logprobs = p.Bool("logprobs").value_or(false);
    top_logprobs = p.Int("top_logprobs", 0, kMaxTopLogprobs).value_or(0);
    if (top_logprobs > 0 && !logprobs)
      Bad("top_logprobs", "'top_logprobs' needs 'logprobs' to be true");
    if (p.Has("response_format")) {
      const json& f = body["response_format"];
      if (!f.is_object() || f.value("type", "") != "text")
        Bad("response_format", "only {\"type\": \"text\"} is supported");
    }
  } else if (auto n_logprobs = p.Int("logprobs", 0, kMaxTopLogprobs)) {
    logprobs = true;
    top_logprobs = *n_logprobs;
  }
  const int64_t n = p.Int("n", 1, limits.max_n).value_or(1);
  if (!chat) {
    if (auto best_of = p.Int("best_of", 1, limits.max_n); best_of && *best_of != n)
      Bad("best_of", "'best_of' other than n is not supported");
  }
  std::string max_tokens_name = "max_tokens";
  const bool echo = !chat && p.Bool("echo").value_or(false);
  // 0 with echo: nothing generated, the answer is the prompt (and its logprobs), as evaluation
  // harnesses ask to score a text.
  std::optional<int64_t> max_tokens = p.Int("max_tokens", 0, INT32_MAX);
  if (chat && p.Has("max_completion_tokens")) {
    max_tokens_name = "max_completion_tokens";
    max_tokens = p.Int("max_completion_tokens", 0, INT32_MAX);
  }
  if (max_tokens && *max_tokens == 0 && !echo) {
    Bad(max_tokens_name, absl::StrCat("'", max_tokens_name, "' must be >= 1",
                                      chat ? "" : " (0 only with 'echo': true)", ", got 0"));
  }
  const auto temperature = p.Number("temperature", 0, 1e6);
  const auto top_p = p.Number("top_p", 0, 1);
  if (top_p && *top_p == 0) Bad("top_p", "'top_p' must be in (0, 1], got 0");
  const auto top_k = p.Int("top_k", -1, INT32_MAX);  // -1: no limit (vLLM's convention)
  const auto seed = p.Int("seed", INT64_MIN, INT64_MAX);
  const bool stream = p.Bool("stream").value_or(false);
  const bool ignore_eos = p.Bool("ignore_eos").value_or(false);
  p.String("user");
  bool include_usage = false;
  if (p.Has("stream_options")) {
    const json& so = body["stream_options"];
    if (!so.is_object()) Bad("stream_options", "'stream_options' must be an object");
    if (!stream) Bad("stream_options", "'stream_options' is only allowed with stream: true");
    for (const auto& [k, v] : so.items()) {
      if (k != "include_usage")
        Bad("stream_options", absl::StrCat("unknown stream option '", k, "'"));
      if (!v.is_boolean() && !v.is_null())
        Bad("stream_options", "'stream_options.include_usage' must be a boolean");
      include_usage = v.is_boolean() && v.get<bool>();
    }
  }
  std::vector<std::string> stops;
  if (p.Has("stop")) {
    const json& s = body["stop"];
    if (s.is_string()) {
      stops.push_back(s.get<std::string>());
    } else if (s.is_array()) {
      if (s.size() > 16) Bad("stop", "'stop' takes at most 16 strings");
      for (const json& x : s) {
        if (!x.is_string()) Bad("stop", "'stop' must be a string or a list of strings");
        stops.push_back(x.get<std::string>());
      }
    } else {
      Bad("stop", "'stop' must be a string or a list of strings");
    }
    for (const std::string& x : stops)
      if (x.empty()) Bad("stop", "'stop' strings must not be empty");
  }
  std::vector<uint32_t> stop_ids;
  if (p.Has("stop_token_ids")) {
    const json& s = body["stop_token_ids"];
    if (!s.is_array()) Bad("stop_token_ids", "'stop_token_ids' must be a list of token ids");
    for (const json& x : s) {
      if (!x.is_number_unsigned() || x.get<uint64_t>() > UINT32_MAX)
        Bad("stop_token_ids", "'stop_token_ids' must be a list of token ids");
      stop_ids.push_back(x.get<uint32_t>());
    }
  }

  // The prompts: text, or token ids.
  struct Prompt {
    std::optional<std::string> text;
    std::vector<uint32_t> ids;
  };
  std::vector<Prompt> prompts;
  if (chat) {
    if (!p.Has("messages")) Bad("messages", "'messages' is required");
    const json& messages = body["messages"];
    if (!messages.is_array() || messages.empty())
      Bad("messages", "'messages' must be a non-empty list of messages");
    if (tokenizer == nullptr || chat_template == nullptr) {
      Bad("messages",
          "this model has no chat template (tokenizer_config.json's chat_template, or "
          "--chat-template FILE); use /v1/completions");
    }
    json rendered_messages = json::array();
    for (size_t i = 0; i < messages.size(); ++i) {
      const json& m = messages[i];
      const std::string param = absl::StrCat("messages[", i, "]");
      if (!m.is_object()) Bad(param, "'" + param + "' must be an object");
      if (!m.contains("role") || !m["role"].is_string())
        Bad(param + ".role", "'" + param + ".role' must be a string");
      const std::string role = m["role"].get<std::string>();
      static const std::set<std::string> kRoles = {"system", "user", "assistant", "developer",
                                                   "tool"};
      if (kRoles.count(role) == 0) Bad(param + ".role", absl::StrCat("unknown role '", role, "'"));
      json message = m;
      message["content"] = ContentText(m.contains("content") ? m["content"] : json(nullptr), i);
      rendered_messages.push_back(std::move(message));
    }
    const bool add_generation_prompt = p.Bool("add_generation_prompt").value_or(true);
    auto text = chat_template->Render(rendered_messages, add_generation_prompt);
    if (!text.ok()) Bad("messages", absl::StrCat("chat template: ", text.status().message()));
    // The template wrote the special tokens (BOS) itself: none are added again.
    auto ids = tokenizer->Encode(*text, /*add_special_tokens=*/false);
    if (!ids.ok()) Bad("messages", std::string(ids.status().message()));
    prompts.push_back({std::nullopt, std::vector<uint32_t>(ids->begin(), ids->end())});
  } else {
    if (!p.Has("prompt")) Bad("prompt", "'prompt' is required");
    const json& pr = body["prompt"];
    auto ids_of = [&](const json& a) {
      std::vector<uint32_t> ids;
      for (const json& x : a) {
        if (!x.is_number_unsigned() || x.get<uint64_t>() > UINT32_MAX)
          Bad("prompt", "'prompt' token ids must be non-negative integers");
        ids.push_back(x.get<uint32_t>());
      }
      return ids;
    };
    if (pr.is_string()) {
      prompts.push_back({pr.get<std::string>(), {}});
    } else if (pr.is_array() && !pr.empty() && pr[0].is_number()) {
      prompts.push_back({std::nullopt, ids_of(pr)});
    } else if (pr.is_array() && !pr.empty()) {
      for (const json& x : pr) {
        if (x.is_string()) {
          prompts.push_back({x.get<std::string>(), {}});
        } else if (x.is_array()) {
          prompts.push_back({std::nullopt, ids_of(x)});
        } else {
          Bad("prompt", "'prompt' must be a string, a list of strings, or token ids");
        }
      }
    } else {
      Bad("prompt", "'prompt' must be a string, a list of strings, or token ids");
    }
    if (prompts.size() * n > static_cast<size_t>(limits.max_n)) {
      Bad("prompt", absl::StrCat("prompts x n must be at most ", limits.max_n));
    }
  }

  std::vector<CompletionChoice>& choices = out.choices;
  for (size_t pi = 0; pi < prompts.size(); ++pi) {
    const Prompt& pr = prompts[pi];
    std::string echo_text;
    uint32_t first_token = pr.ids.empty() ? 0 : pr.ids[0];
    if (echo && logprobs && pr.text && tokenizer != nullptr) {
      // As the gateway will tokenize it (an empty text is refused there).
      auto ids = tokenizer->Encode(*pr.text, /*add_special_tokens=*/true);
      if (ids.ok() && !ids->empty()) first_token = static_cast<uint32_t>((*ids)[0]);
    }
    if (echo) {
      if (pr.text) {
        echo_text = *pr.text;
      } else if (tokenizer != nullptr) {
        std::vector<int32_t> ids(pr.ids.begin(), pr.ids.end());
        for (int32_t id : ids) {
          if (id < 0 || id >= tokenizer->vocab_size())
            Bad("prompt", absl::StrCat("prompt token id ", id, " is outside the vocabulary"));
        }
        auto t = tokenizer->Decode(ids, /*skip_special_tokens=*/false);
        if (t.ok()) echo_text = *t;
      }
    }
    for (int64_t j = 0; j < n; ++j) {
      CompletionChoice c;
      c.prompt = static_cast<int>(pi);
      c.echo = echo_text;
      c.first_prompt_token = first_token;
      c.text_prompt = pr.text.has_value();
      dsmoe::v1::GenerateRequest& g = c.request;
      g.set_model(limits.model_name);
      if (pr.text) {
        g.set_text(*pr.text);
      } else {
        g.mutable_token_ids()->mutable_ids()->Add(pr.ids.begin(), pr.ids.end());
      }
      if (max_tokens) {
        g.set_max_tokens(static_cast<uint32_t>(*max_tokens));
      } else if (chat) {
        // OpenAI's chat default: as long as the context allows.
        const int64_t room = limits.max_context - static_cast<int64_t>(pr.ids.size());
        g.set_max_tokens(static_cast<uint32_t>(
            std::max<int64_t>(1, std::min<int64_t>(limits.max_tokens_limit, room))));
      }  // completions: the gateway's default (16, as OpenAI's)
      if (temperature) g.set_temperature(static_cast<float>(*temperature));
      if (top_p) g.set_top_p(static_cast<float>(*top_p));
      if (top_k && *top_k > 0) g.set_top_k(static_cast<uint32_t>(*top_k));
      // Choices of one request differ; a given seed makes the whole answer reproducible.
      g.set_seed(seed ? static_cast<uint64_t>(*seed) + static_cast<uint64_t>(j) : RandomSeed());
      for (const std::string& s : stops) g.add_stop(s);
      g.mutable_stop_token_ids()->Add(stop_ids.begin(), stop_ids.end());
      g.set_ignore_eos(ignore_eos);
      g.set_logprobs(logprobs);
      g.set_top_logprobs(static_cast<int32_t>(top_logprobs));
      // The echoed prompt's logprobs; with max_tokens 0 the gateway needs them asked even when
      // not shown (they are then the whole of the work, and cheap beside the prefill).
      if (echo && (logprobs || (max_tokens && *max_tokens == 0)))
        g.set_prompt_logprobs(static_cast<int32_t>(top_logprobs));
      choices.push_back(std::move(c));
    }
  }
  out.stream = stream;
  out.include_usage = include_usage;
  out.logprobs = logprobs;
  out.echo_logprobs = echo && logprobs;
  out.max_tokens_name = max_tokens_name;
}

}  // namespace

ParsedCompletion ParseCompletionRequest(std::string_view body, bool chat,
                                        const CompletionLimits& limits, const Tokenizer* tokenizer,
                                        const ChatTemplate* chat_template) {
  ParsedCompletion parsed;
  try {
    Parse(body, chat, limits, tokenizer, chat_template, parsed.request);
  } catch (const BadParam& b) {
    parsed.error = OpenAiError{b.status, b.message, b.param, b.code};
  } catch (const std::exception& e) {
    // A JSON access the checks missed: still the client's request.
    parsed.error = OpenAiError{400, absl::StrCat("invalid request: ", e.what()), "", ""};
  }
  if (parsed.error) parsed.request = CompletionRequest{};
  return parsed;
}

}  // namespace dsmoe::http
