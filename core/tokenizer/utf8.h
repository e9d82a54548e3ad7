// UTF-8 helpers shared by the tokenizer modules: strict validation (encode refuses invalid
// input), code-point iteration, and the lossy conversion that Hugging Face `tokenizers` applies
// when decoding bytes (Rust's String::from_utf8_lossy: one U+FFFD per maximal invalid subpart).
// All functions are pure and thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace dsmoe::tokenizer_internal {

inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD

// OK iff `text` is well-formed UTF-8 (no overlongs, surrogates or code points > U+10FFFF).
// Otherwise InvalidArgument naming `what`, the byte offset and the offending byte.
absl::Status ValidateUtf8(std::string_view text, std::string_view what);

// Length of the UTF-8 sequence that starts with lead byte `b` (1 for invalid leads, so that
// iteration over already-validated text can never stall).
inline int Utf8SeqLen(uint8_t b) {
  if (b < 0x80) return 1;
  if (b >= 0xF0) return 4;
  if (b >= 0xE0) return 3;
  if (b >= 0xC0) return 2;
  return 1;
}

// Decodes the code point at `s[i]` of valid UTF-8 and advances `i`.
inline char32_t NextCodePoint(std::string_view s, size_t& i) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data()) + i;
  const int n = Utf8SeqLen(p[0]);
  i += n;
  switch (n) {
    case 1:
      return p[0];
    case 2:
      return ((p[0] & 0x1Fu) << 6) | (p[1] & 0x3Fu);
    case 3:
      return ((p[0] & 0x0Fu) << 12) | ((p[1] & 0x3Fu) << 6) | (p[2] & 0x3Fu);
    default:
      return ((p[0] & 0x07u) << 18) | ((p[1] & 0x3Fu) << 12) | ((p[2] & 0x3Fu) << 6) |
             (p[3] & 0x3Fu);
  }
}

// Decodes the code point that ends just before `s[i]` of valid UTF-8 and moves `i` back to it.
char32_t PrevCodePoint(std::string_view s, size_t& i);

// Appends the UTF-8 encoding of `cp` to `out`.
void AppendUtf8(char32_t cp, std::string& out);

// Appends `bytes` to `out`, replacing invalid subparts like Rust's String::from_utf8_lossy.
// If `hold_incomplete_tail` is set, a trailing sequence that is incomplete but could still
// become valid is not converted; its length is returned so the caller can keep it for later.
// (Used by the streaming decoder: what it emits is then always a prefix of the full decode.)
size_t AppendUtf8Lossy(std::string_view bytes, std::string& out, bool hold_incomplete_tail = false);

// True iff `bytes` is valid UTF-8 (no error details; the fast check for hot paths).
bool IsValidUtf8(std::string_view bytes);

}  // namespace dsmoe::tokenizer_internal
