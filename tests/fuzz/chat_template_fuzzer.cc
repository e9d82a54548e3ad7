// Fuzz target: a chat template (the Jinja text of tokenizer_config.json's chat_template, or
// --chat-template FILE) parsed and, if accepted, rendered with a fixed conversation both with and
// without the generation prompt. Beyond not crashing, hanging or overflowing: an error is an
// InvalidArgument status with a message, and rendering the same template twice gives the same
// text (no state leaks between renders).
#include <cstdint>
#include <string>

#include "core/tokenizer/chat_template.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size > 16 << 10) return 0;
  const std::string source(reinterpret_cast<const char*>(data), size);
  auto t = dsmoe::ChatTemplate::Parse(source, {{"bos_token", "<s>"}, {"eos_token", "</s>"}});
  if (!t.ok()) {
    DSMOE_FUZZ_CHECK(t.status().code() == absl::StatusCode::kInvalidArgument);
    DSMOE_FUZZ_CHECK(!t.status().message().empty());
    return 0;
  }
  const nlohmann::json messages = {{{"role", "system"}, {"content", "Be brief."}},
                                   {{"role", "user"}, {"content", "Hi \xc3\xa9 {{ x }}"}},
                                   {{"role", "assistant"}, {"content", ""}},
                                   {{"role", "user"}, {"content", "again"}}};
  for (bool add : {false, true}) {
    auto a = (*t)->Render(messages, add);
    auto b = (*t)->Render(messages, add);
    DSMOE_FUZZ_CHECK(a.ok() == b.ok());
    if (a.ok()) {
      DSMOE_FUZZ_CHECK(*a == *b);
    } else {
      DSMOE_FUZZ_CHECK(a.status().code() == absl::StatusCode::kInvalidArgument);
    }
  }
  return 0;
}
