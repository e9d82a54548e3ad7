// Unicode character data for the tokenizer, taken from ICU (Debian's libicu, Unicode 15 in
// Debian 12). Hugging Face `tokenizers` uses Rust's and Oniguruma's Unicode 15 tables, while
// Debian 12's PCRE2 (10.42) is at Unicode 14; ICU is therefore the single authority for
// character properties (the regex layer patches \p{..} classes with the difference, see
// regex.h), for normalization forms and for lower-casing. All functions are thread-safe.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace dsmoe::tokenizer_internal {

// Rust's char::is_whitespace (the White_Space property).
bool IsWhitespace(char32_t c);

// A "word character" for AddedToken.single_word: alphabetic, mark, decimal digit, connector
// punctuation or join control (the Unicode \w of the `regex` crate).
bool IsWordChar(char32_t c);

enum class NormalForm { kNfc, kNfd, kNfkc, kNfkd };

// Normalizes valid UTF-8 `text`; the result is valid UTF-8. The reference normalizes with the
// `unicode-normalization-alignments` crate, whose data is Unicode 11: code points assigned
// later are unknown to it, hence left unchanged and never composed with. They are treated the
// same way here (verified against the reference, e.g. U+A7F2 and U+1F16C stay as they are).
absl::StatusOr<std::string> Normalize(NormalForm form, std::string_view text);

// Lower-cases each code point on its own (Rust's char::to_lowercase, as the reference's
// Lowercase normalizer does; hence no final-sigma rule).
absl::StatusOr<std::string> ToLower(std::string_view text);

// Code-point ranges [first, last] whose general category is in the class named by a \p{..}
// general-category name (e.g. "L", "Lu", "N", "P", "S", "M", "Z") according to ICU but which
// the linked PCRE2 does not know yet (assigned after its Unicode version). Empty for names that
// are not general categories or when PCRE2 is as recent as ICU.
const std::vector<std::pair<char32_t, char32_t>>& CategoryDelta(std::string_view gc_name);

// True for general-category names usable in \p{..} ("L", "Lu", "N", ...).
bool IsGeneralCategoryName(std::string_view name);

}  // namespace dsmoe::tokenizer_internal
