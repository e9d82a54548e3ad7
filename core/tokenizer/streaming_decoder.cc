// StreamingDecoder: decodes a window of recent ids and emits the part of its text that can no
// longer change. What may still change is (a) a trailing run of U+FFFD — an incomplete UTF-8
// sequence (byte-level) or an invalid <0xXX> group (ByteFallback) that later bytes may complete
// — and (b) trailing characters a Strip decoder could remove. When the decoder is
// concatenation-safe and nothing is held back, the window is cleared, so the work per id stays
// O(1) amortised.
#include "absl/strings/str_cat.h"
#include "core/tokenizer/strings.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/utf8.h"
#include "core/util/status.h"

namespace dsmoe {

using tokenizer_internal::Cat;
using tokenizer_internal::kReplacementChar;

StreamingDecoder::StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(tokenizer), skip_special_tokens_(skip_special_tokens) {}

absl::StatusOr<std::string> StreamingDecoder::Push(int32_t id) {
  if (id < 0) return absl::InvalidArgumentError(Cat("StreamingDecoder: negative token id ", id));
  window_.push_back(id);
  // A trailing run of byte tokens decodes as a group that the next byte token can still turn
  // from text into U+FFFDs (ByteFallback): it is not final until a non-byte token follows.
  size_t settled = window_.size();
  if (tokenizer_.decoder_groups_byte_tokens()) {
    while (settled > 0 && tokenizer_.IsByteFallbackToken(window_[settled - 1])) --settled;
  }
  DSMOE_ASSIGN_OR_RETURN(
      const std::string text,
      tokenizer_.Decode(std::span<const int32_t>(window_.data(), settled), skip_special_tokens_));
  // Length of the final prefix of `text`.
  size_t stable = text.size();
  while (stable >= kReplacementChar.size() &&
         std::string_view(text).substr(stable - kReplacementChar.size(), kReplacementChar.size()) ==
             kReplacementChar) {
    stable -= kReplacementChar.size();
  }
  for (int k = 0; k < tokenizer_.decoder_trailing_strip_chars() && stable > 0; ++k) {
    size_t p = stable;
    tokenizer_internal::PrevCodePoint(text, p);
    stable = p;
  }
  if (text.compare(0, emitted_.size(), emitted_) != 0) {
    // Cannot happen for the supported decoders; refuse rather than emit inconsistent text.
    return absl::InternalError("StreamingDecoder: decoded text changed before the emitted point");
  }
  std::string out;
  if (stable > emitted_.size()) {
    out = text.substr(emitted_.size(), stable - emitted_.size());
    emitted_.append(out);
  }
  if (tokenizer_.decoder_concatenation_safe() && settled == window_.size() &&
      stable == text.size() && emitted_.size() == text.size()) {
    window_.clear();
    emitted_.clear();
  }
  return out;
}

absl::StatusOr<std::string> StreamingDecoder::Finish() {
  DSMOE_ASSIGN_OR_RETURN(const std::string text, tokenizer_.Decode(window_, skip_special_tokens_));
  if (text.compare(0, emitted_.size(), emitted_) != 0) {
    return absl::InternalError("StreamingDecoder: decoded text changed before the emitted point");
  }
  std::string out = text.substr(emitted_.size());
  window_.clear();
  emitted_.clear();
  return out;
}

}  // namespace dsmoe
