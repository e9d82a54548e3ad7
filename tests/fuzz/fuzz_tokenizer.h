// The tokenizer the request fuzz targets encode with: DeepSeek's tokenizer.json from the
// checked-in corpus of real tokenizers (DSMOE_FUZZ_TOKENIZERS), loaded once.
#pragma once

#include <cstdlib>
#include <string>

#include "core/tokenizer/tokenizer.h"

namespace dsmoe::fuzz {

inline const Tokenizer* DeepSeekTokenizer() {
  static const Tokenizer* t = [] {
    auto loaded = Tokenizer::FromFile(std::string(DSMOE_FUZZ_TOKENIZERS) + "/deepseek.json");
    if (!loaded.ok()) std::abort();  // a broken checkout, not a finding
    return loaded->release();
  }();
  return t;
}

}  // namespace dsmoe::fuzz
