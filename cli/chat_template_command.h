// `dsmoe chat-template`: renders a checkpoint's chat template (core/tokenizer/chat_template.h)
// for a conversation, as the gateway's /v1/chat/completions does before tokenizing: what a
// user runs to see the exact text (and tokens) a chat request becomes.
//
//   dsmoe chat-template (--model DIR | --tokenizer-config FILE) --messages FILE|-
//                       [--chat-template FILE] [--add-generation-prompt] [--jsonl] [--ids]
//     --model DIR              the checkpoint: DIR/tokenizer_config.json (+ tokenizer.json for
//     --ids)
//     --tokenizer-config FILE  a tokenizer_config.json (tokenizer.json beside it for --ids)
//     --messages FILE          a JSON list of {role, content, ...}; "-" reads stdin
//     --chat-template FILE     a Jinja template replacing the config's (the config still gives
//                              bos_token, eos_token, ...), as the gateway's --chat-template
//     --add-generation-prompt  end with the assistant's prompt (the chat endpoint's default)
//     --jsonl                  each input line is one conversation; each output line the
//                              rendered text as one JSON string
//     --ids                    also tokenize the text (no special tokens added: the template
//                              writes them), printing {"text": ..., "ids": [...]} per
//                              conversation, one JSON object a line
//   Output without --jsonl/--ids: exactly the rendered text, nothing added (no newline).
//   Exit codes: 0 success, 1 a render or file error (one line on stderr), 2 bad options.
#pragma once

#include <iosfwd>
#include <string>

namespace dsmoe::cli {

struct ChatTemplateOptions {
  std::string model;             // --model DIR
  std::string tokenizer_config;  // --tokenizer-config FILE
  std::string messages;          // --messages FILE or "-"
  std::string chat_template;     // --chat-template FILE
  bool add_generation_prompt = false;
  bool jsonl = false;
  bool ids = false;
};

int RunChatTemplate(const ChatTemplateOptions& options, std::istream& in, std::ostream& out,
                    std::ostream& err);
int RunChatTemplate(const ChatTemplateOptions& options);  // stdin / stdout / stderr

}  // namespace dsmoe::cli
