#include "cli/chat_template_command.h"

#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/tokenizer/chat_template.h"
#include "core/tokenizer/tokenizer.h"
#include "nlohmann/json.hpp"

namespace dsmoe::cli {
namespace {

using json = nlohmann::json;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return std::move(ss).str();
}

// The config's special tokens (bos_token, eos_token, ...: a string or {"content": ...}), as
// ChatTemplate::FromTokenizerConfig gives them to its template.
json SpecialTokens(const json& config) {
  json special = json::object();
  for (const auto& [k, v] : config.items()) {
    if (k.size() < 6 || k.compare(k.size() - 6, 6, "_token") != 0) continue;
    if (v.is_string()) {
      special[k] = v;
    } else if (v.is_object() && v.contains("content") && v["content"].is_string()) {
      special[k] = v["content"];
    }
  }
  return special;
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> LoadTemplate(const ChatTemplateOptions& o,
                                                           const std::string& config_path) {
  if (o.chat_template.empty()) return ChatTemplate::FromTokenizerConfig(config_path);
  DSMOE_ASSIGN_OR_RETURN(std::string source, ReadFile(o.chat_template));
  json special = json::object();
  if (std::filesystem::exists(config_path)) {
    DSMOE_ASSIGN_OR_RETURN(std::string text, ReadFile(config_path));
    json config = json::parse(text, nullptr, false);
    if (config.is_discarded() || !config.is_object())
      return absl::InvalidArgumentError(absl::StrCat(config_path, ": not a JSON object"));
    special = SpecialTokens(config);
  }
  auto t = ChatTemplate::Parse(source, special);
  if (!t.ok())
    return absl::InvalidArgumentError(absl::StrCat(o.chat_template, ": ", t.status().message()));
  return t;
}

}  // namespace

int RunChatTemplate(const ChatTemplateOptions& o, std::istream& in, std::ostream& out,
                    std::ostream& err) {
  auto fail = [&](const std::string& message, int code) {
    err << "dsmoe chat-template: " << message << "\n";
    return code;
  };
  if (o.model.empty() == o.tokenizer_config.empty())
    return fail("give exactly one of --model DIR or --tokenizer-config FILE", 2);
  if (o.messages.empty()) return fail("--messages FILE (or - for stdin) is required", 2);
  namespace fs = std::filesystem;
  const fs::path config_path =
      o.model.empty() ? fs::path(o.tokenizer_config) : fs::path(o.model) / "tokenizer_config.json";
  auto tmpl = LoadTemplate(o, config_path.string());
  if (!tmpl.ok()) return fail(std::string(tmpl.status().message()), 1);
  std::unique_ptr<Tokenizer> tokenizer;
  if (o.ids) {
    const fs::path tokenizer_path = config_path.parent_path() / "tokenizer.json";
    auto t = Tokenizer::FromFile(tokenizer_path.string());
    if (!t.ok()) {
      return fail(absl::StrCat("--ids needs ", tokenizer_path.string(), ": ", t.status().message()),
                  1);
    }
    tokenizer = std::move(*t);
  }
  std::string input;
  if (o.messages == "-") {
    std::ostringstream ss;
    ss << in.rdbuf();
    input = std::move(ss).str();
  } else {
    auto text = ReadFile(o.messages);
    if (!text.ok()) return fail(std::string(text.status().message()), 1);
    input = std::move(*text);
  }
  // One conversation, or (--jsonl) one per non-empty line.
  std::vector<std::string> conversations;
  if (o.jsonl) {
    std::istringstream lines(input);
    for (std::string line; std::getline(lines, line);) {
      if (line.find_first_not_of(" \t\r") != std::string::npos) conversations.push_back(line);
    }
  } else {
    conversations.push_back(input);
  }
  for (size_t i = 0; i < conversations.size(); ++i) {
    const std::string where = o.jsonl ? absl::StrCat("line ", i + 1, ": ") : "";
    json messages = json::parse(conversations[i], nullptr, /*allow_exceptions=*/false);
    if (messages.is_discarded() || !messages.is_array())
      return fail(absl::StrCat(where, "the messages must be a JSON list of {role, content}"), 1);
    auto text = (*tmpl)->Render(messages, o.add_generation_prompt);
    if (!text.ok()) return fail(absl::StrCat(where, text.status().message()), 1);
    if (o.ids) {
      auto ids = tokenizer->Encode(*text, /*add_special_tokens=*/false);
      if (!ids.ok()) return fail(absl::StrCat(where, ids.status().message()), 1);
      out << json{{"text", *text}, {"ids", *ids}}.dump(-1, ' ', false,
                                                       json::error_handler_t::replace)
          << "\n";
    } else if (o.jsonl) {
      out << json(*text).dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    } else {
      out << *text;
    }
  }
  out.flush();
  return 0;
}

int RunChatTemplate(const ChatTemplateOptions& options) {
  return RunChatTemplate(options, std::cin, std::cout, std::cerr);
}

}  // namespace dsmoe::cli
