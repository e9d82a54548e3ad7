// Chat templates: the Jinja template of tokenizer_config.json's `chat_template`, rendered with
// the conversation as Hugging Face's apply_chat_template does (trim_blocks and lstrip_blocks on;
// variables messages, add_generation_prompt, bos_token, eos_token, the other special tokens of
// the config, raise_exception, namespace, strftime_now).
//
// The renderer implements the Jinja subset real chat templates use (DeepSeek, Llama 3, Qwen,
// Gemma, Mistral): statements if/elif/else, for (loop variables, else, an if filter), set (also
// `ns.attr =` and block set), macro/call of macros, filter blocks are not; expressions with
// literals, lists, dicts, attribute and subscript access, slices, arithmetic, ~, comparisons,
// in / not in, and/or/not, the conditional expression, tests (defined, none, string, mapping,
// ...), filters (trim, tojson, length, upper, lower, default, join, ...) and string/dict methods
// (strip, startswith, split, items, get, ...). A template using anything else is refused at
// Parse with a message naming the construct and its line, so a gateway refuses it at start-up,
// not at the first chat request.
//
// Const after construction; Render is thread-safe.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "core/util/status.h"
#include "nlohmann/json.hpp"

namespace dsmoe {

namespace jinja {
struct Node;
}

class ChatTemplate {
 public:
  // `special_tokens`: bos_token, eos_token, ... as strings (the config's values).
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Parse(const std::string& source,
                                                             nlohmann::json special_tokens = {});
  // The template of a tokenizer_config.json (a string, or the "default" of a list of
  // {name, template}), with its special tokens. NOT_FOUND when it has none.
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> FromTokenizerConfig(const std::string& path);
  ~ChatTemplate();

  // `messages`: a JSON list of {role, content, ...}. Errors: raise_exception's message, or what
  // went wrong (an undefined name called, a type error), naming the template line.
  absl::StatusOr<std::string> Render(const nlohmann::json& messages,
                                     bool add_generation_prompt) const;
  // Renders with a whole context (every variable the template sees, besides the globals).
  absl::StatusOr<std::string> RenderContext(const nlohmann::json& context) const;

 private:
  ChatTemplate() = default;
  std::shared_ptr<const jinja::Node> root_;
  nlohmann::json special_tokens_;
};

// Chat templates known by name (`make-model --chat-template deepseek-moe`): the text, or nullopt
// for an unknown name. deepseek-moe is deepseek-ai/deepseek-moe-16b-chat's tokenizer_config.json
// chat_template.
std::optional<std::string> BuiltinChatTemplate(const std::string& name);
// Their names, comma-separated, for help texts and errors.
std::string BuiltinChatTemplateNames();

}  // namespace dsmoe
