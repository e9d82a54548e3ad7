// Fuzz target: loading tokenizer.json (core/tokenizer). Whatever the text, FromJson returns a
// tokenizer or an error; a tokenizer it accepts must encode and decode without failing on
// valid UTF-8, and give ids inside its vocabulary.
#include <cstdint>
#include <string>
#include <string_view>

#include "core/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view json(reinterpret_cast<const char*>(data), size);
  auto tokenizer = dsmoe::Tokenizer::FromJson(json, "tokenizer.json");
  if (!tokenizer.ok()) return 0;
  for (std::string_view text : {"Hello world", " 12345 混合专家\n\t<s>", ""}) {
    for (bool special : {false, true}) {
      auto ids = (*tokenizer)->Encode(text, special);
      DSMOE_FUZZ_CHECK(ids.ok());
      for (int32_t id : *ids) {
        if (id < 0 || id >= (*tokenizer)->vocab_size()) {
          std::fprintf(stderr, "id %d outside [0, %d) encoding '%.*s'\n", id,
                       (*tokenizer)->vocab_size(), static_cast<int>(text.size()), text.data());
        }
        DSMOE_FUZZ_CHECK(id >= 0 && id < (*tokenizer)->vocab_size());
      }
      DSMOE_FUZZ_CHECK((*tokenizer)->Decode(*ids, /*skip_special_tokens=*/true).ok());
    }
  }
  return 0;
}
