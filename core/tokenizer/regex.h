// Regular expressions for tokenizer.json patterns (Split pre-tokenizer, Replace normalizer and
// decoder), matched with PCRE2 (UTF + UCP, JIT-compiled).
//
// Why PCRE2: Hugging Face `tokenizers` compiles these patterns with Oniguruma; the patterns use
// Unicode classes (\p{L}, \p{N}, ...), CJK ranges, lookaheads and (?i:...) groups, which PCRE2
// supports with the same backtracking (leftmost, first-alternative) semantics, and its JIT is
// several times faster than an interpreter (the pre-tokenizer regex dominates encode time).
// ICU's regex engine was the alternative; it works on UTF-16 and is markedly slower. Where
// Oniguruma and PCRE2 differ, the pattern is translated (see TranslateOnigurumaPattern):
//   \s, \S   Oniguruma: White_Space (includes U+0085); PCRE2 UCP: Z + \t..\r (no U+0085).
//   \h, \H   Oniguruma: hex digit; PCRE2: horizontal space.
//   \p{X}    Debian 12's PCRE2 has Unicode 14 tables, the reference Unicode 15: code points
//            assigned since are added from ICU (unicode.h).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dsmoe::tokenizer_internal {

// Byte span [first, second) into a string.
using Span = std::pair<uint32_t, uint32_t>;

// Rewrites an Oniguruma (Ruby syntax) pattern into an equivalent PCRE2 pattern (see above).
// Errors name the construct that has no PCRE2 equivalent (e.g. class intersection `&&`).
absl::StatusOr<std::string> TranslateOnigurumaPattern(std::string_view pattern);

// A compiled pattern: a regex or a literal string. Immutable and thread-safe after creation
// (per-thread match scratch lives in thread-local storage).
class Matcher {
 public:
  // `pattern` is an Oniguruma pattern as found in tokenizer.json.
  static absl::StatusOr<std::unique_ptr<Matcher>> Regex(std::string_view pattern);
  // Matches `literal` exactly (the {"String": ...} form in tokenizer.json).
  static std::unique_ptr<Matcher> Literal(std::string_view literal);

  ~Matcher();
  Matcher(const Matcher&) = delete;
  Matcher& operator=(const Matcher&) = delete;

  // Appends the spans of all non-overlapping matches in `text` (valid UTF-8), leftmost first.
  // Empty matches are not reported (Hugging Face drops empty splits); after one, the search
  // resumes one character later, as Oniguruma's find_iter does.
  absl::Status FindAll(std::string_view text, std::vector<Span>& out) const;

  const std::string& source() const { return source_; }

 private:
  Matcher() = default;

  std::string source_;    // the pattern as written in the file (for messages)
  std::string literal_;   // literal form, when code_ == nullptr
  void* code_ = nullptr;  // pcre2_code_8*
};

}  // namespace dsmoe::tokenizer_internal
