// Fuzz target: encoding arbitrary text with the tokenizers of tests/fuzz/tokenizers (one per
// pipeline family dsmoe supports), then decoding, whole and streamed. Byte 0 of the input picks
// the tokenizer (bits 0-1) and add_special_tokens (bit 2); the rest is the text. Beyond not
// crashing: invalid UTF-8 is refused with InvalidArgument, valid text encodes to in-vocabulary
// ids, byte-level tokenizers decode back to exactly the input, and the streaming decoder's
// pieces add up to the whole decode.
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"
#include "tests/fuzz/fuzz_check.h"

namespace {

struct Loaded {
  std::unique_ptr<dsmoe::Tokenizer> tokenizer;
  bool byte_level_round_trip;  // decode(encode(x)) == x for every valid x
};

std::vector<Loaded>& Tokenizers() {
  static std::vector<Loaded>* all = [] {
    auto* v = new std::vector<Loaded>;
    const std::string dir = DSMOE_FUZZ_TOKENIZERS;
    // gpt2 has no normalizer and a byte-level pre-tokenizer and decoder: exact round trip.
    for (const auto& [name, exact] : std::vector<std::pair<std::string, bool>>{
             {"gpt2", true}, {"deepseek", true}, {"sentencepiece", false}, {"digits", false}}) {
      auto t = dsmoe::Tokenizer::FromFile(dir + "/" + name + ".json");
      if (!t.ok()) {
        std::fprintf(stderr, "%s\n", std::string(t.status().message()).c_str());
        std::abort();
      }
      v->push_back({std::move(*t), exact});
    }
    return v;
  }();
  return *all;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const Loaded& t = Tokenizers()[data[0] % 4];
  const bool special = (data[0] & 4) != 0;
  const std::string text(reinterpret_cast<const char*>(data + 1), size - 1);
  auto ids = t.tokenizer->Encode(text, special);
  if (!ids.ok()) {
    DSMOE_FUZZ_CHECK(ids.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  for (int32_t id : *ids) DSMOE_FUZZ_CHECK(id >= 0 && id < t.tokenizer->vocab_size());
  auto whole = t.tokenizer->Decode(*ids, /*skip_special_tokens=*/false);
  DSMOE_FUZZ_CHECK(whole.ok());
  if (t.byte_level_round_trip && !special) DSMOE_FUZZ_CHECK(*whole == text);
  dsmoe::StreamingDecoder stream(*t.tokenizer, /*skip_special_tokens=*/false);
  std::string streamed;
  for (int32_t id : *ids) {
    auto piece = stream.Push(id);
    DSMOE_FUZZ_CHECK(piece.ok());
    streamed += *piece;
  }
  auto rest = stream.Finish();
  DSMOE_FUZZ_CHECK(rest.ok());
  streamed += *rest;
  DSMOE_FUZZ_CHECK(streamed == *whole);
  return 0;
}
