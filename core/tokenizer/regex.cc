#include "core/tokenizer/regex.h"

#include "core/tokenizer/strings.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "core/tokenizer/unicode.h"
#include "core/tokenizer/utf8.h"

namespace dsmoe::tokenizer_internal {
namespace {

// Oniguruma's \s: the White_Space property.
constexpr std::string_view kSpaceRanges =
    "\\x{9}-\\x{D}\\x{20}\\x{85}\\x{A0}\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}\\x{202F}"
    "\\x{205F}\\x{3000}";
constexpr std::string_view kHexRanges = "0-9a-fA-F";

std::string RangesToClassBody(const std::vector<std::pair<char32_t, char32_t>>& ranges) {
  std::string out;
  for (const auto& [a, b] : ranges) {
    absl::StrAppendFormat(&out, "\\x{%X}", static_cast<uint32_t>(a));
    if (b != a) absl::StrAppendFormat(&out, "-\\x{%X}", static_cast<uint32_t>(b));
  }
  return out;
}

// Per-thread PCRE2 scratch: match data for group 0 and a JIT stack large enough for long runs.
struct ThreadScratch {
  pcre2_match_data* match_data = nullptr;
  pcre2_match_context* context = nullptr;
  pcre2_jit_stack* jit_stack = nullptr;
  ThreadScratch() {
    match_data = pcre2_match_data_create(1, nullptr);
    context = pcre2_match_context_create(nullptr);
    jit_stack = pcre2_jit_stack_create(64 * 1024, 16 * 1024 * 1024, nullptr);
    pcre2_jit_stack_assign(context, nullptr, jit_stack);
  }
  ~ThreadScratch() {
    pcre2_jit_stack_free(jit_stack);
    pcre2_match_context_free(context);
    pcre2_match_data_free(match_data);
  }
};

ThreadScratch& Scratch() {
  thread_local ThreadScratch scratch;
  return scratch;
}

std::string Pcre2Error(int code) {
  PCRE2_UCHAR buf[256];
  pcre2_get_error_message(code, buf, sizeof(buf));
  return reinterpret_cast<const char*>(buf);
}

// True if PCRE2 knows `name` as a script (accepts \p{sc:name}).
bool IsScriptName(std::string_view name) {
  const std::string probe = Cat("\\p{sc:", name, "}");
  int err = 0;
  PCRE2_SIZE off = 0;
  pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(probe.data()), probe.size(),
                                   PCRE2_UTF | PCRE2_UCP, &err, &off, nullptr);
  if (code == nullptr) return false;
  pcre2_code_free(code);
  return true;
}

}  // namespace

absl::StatusOr<std::string> TranslateOnigurumaPattern(std::string_view p) {
  std::string out;
  out.reserve(p.size() * 2);
  bool in_class = false;
  size_t i = 0;
  auto unsupported = [&](std::string_view what) {
    return absl::InvalidArgumentError(
        Cat("regex `", p, "`: ", what, " has no PCRE2 equivalent (unsupported)"));
  };
  while (i < p.size()) {
    const char c = p[i];
    if (c == '\\' && i + 1 < p.size()) {
      const char e = p[i + 1];
      if (e == 'p' || e == 'P') {
        // \pL or \p{Name} or \p{^Name}
        size_t j = i + 2;
        std::string_view name;
        if (j < p.size() && p[j] == '{') {
          const size_t close = p.find('}', j);
          if (close == std::string_view::npos) return unsupported("unterminated \\p{");
          name = p.substr(j + 1, close - j - 1);
          j = close + 1;
        } else {
          name = p.substr(j, 1);
          j += 1;
        }
        bool negated = e == 'P';
        std::string_view bare = name;
        if (!bare.empty() && bare[0] == '^') {
          negated = !negated;
          bare.remove_prefix(1);
        }
        const auto& delta = CategoryDelta(bare);
        const std::string original(p.substr(i, j - i));
        if (!IsGeneralCategoryName(bare) && IsScriptName(bare)) {
          // Oniguruma's \p{Script} is the Script property; PCRE2's plain \p{Script} means
          // Script_Extensions (e.g. U+30FC is Common but has Hiragana in its extensions).
          out += Cat("\\", std::string(1, e), "{", name.substr(0, name.size() - bare.size()),
                     "sc:", bare, "}");
        } else if (delta.empty()) {
          out += original;
        } else if (in_class) {
          if (negated) {
            out += original;  // cannot subtract inside a class; only newer code points differ
          } else {
            out += Cat("\\p{", bare, "}", RangesToClassBody(delta));
          }
        } else {
          out += Cat(negated ? "[^" : "[", "\\p{", bare, "}", RangesToClassBody(delta), "]");
        }
        i = j;
        continue;
      }
      if (e == 's' || e == 'h') {
        const std::string_view body = e == 's' ? kSpaceRanges : kHexRanges;
        out += Cat(in_class ? "" : "[", body, in_class ? "" : "]");
        i += 2;
        continue;
      }
      if (e == 'S' || e == 'H') {
        if (in_class) return unsupported(Cat("\\", std::string(1, e), " inside a character class"));
        out += Cat("[^", e == 'S' ? kSpaceRanges : kHexRanges, "]");
        i += 2;
        continue;
      }
      // Any other escape: copy it with the whole (possibly multi-byte) escaped character.
      const size_t len = 1 + Utf8SeqLen(static_cast<uint8_t>(e));
      out.append(p.substr(i, len));
      i += len;
      continue;
    }
    if (in_class) {
      if (c == ']') {
        in_class = false;
      } else if (c == '[') {
        if (i + 1 < p.size() && p[i + 1] == ':') {
          const size_t close = p.find(":]", i + 2);
          if (close == std::string_view::npos) return unsupported("unterminated POSIX class");
          out.append(p.substr(i, close + 2 - i));
          i = close + 2;
          continue;
        }
        return unsupported("a nested character class");
      } else if (c == '&' && i + 1 < p.size() && p[i + 1] == '&') {
        return unsupported("class intersection `&&`");
      }
      out.push_back(c);
      ++i;
      continue;
    }
    if (c == '[') {
      in_class = true;
      out.push_back(c);
      ++i;
      if (i < p.size() && p[i] == '^') out.push_back(p[i++]);
      if (i < p.size() && p[i] == ']') out += "\\]", ++i;  // a leading ']' is literal
      continue;
    }
    out.push_back(c);
    ++i;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<Matcher>> Matcher::Regex(std::string_view pattern) {
  auto translated = TranslateOnigurumaPattern(pattern);
  if (!translated.ok()) return translated.status();
  int err = 0;
  PCRE2_SIZE err_offset = 0;
  pcre2_code* code =
      pcre2_compile(reinterpret_cast<PCRE2_SPTR>(translated->data()), translated->size(),
                    PCRE2_UTF | PCRE2_UCP, &err, &err_offset, nullptr);
  if (code == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("regex `%s`: PCRE2 compile error at offset %d: %s", std::string(pattern),
                        err_offset, Pcre2Error(err)));
  }
  // JIT is an optimisation; without it (e.g. no executable memory) the interpreter still works.
  pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);
  std::unique_ptr<Matcher> m(new Matcher());
  m->source_ = std::string(pattern);
  m->code_ = code;
  return m;
}

std::unique_ptr<Matcher> Matcher::Literal(std::string_view literal) {
  std::unique_ptr<Matcher> m(new Matcher());
  m->source_ = std::string(literal);
  m->literal_ = std::string(literal);
  return m;
}

Matcher::~Matcher() {
  if (code_ != nullptr) pcre2_code_free(static_cast<pcre2_code*>(code_));
}

absl::Status Matcher::FindAll(std::string_view text, std::vector<Span>& out) const {
  if (code_ == nullptr) {
    if (literal_.empty()) return absl::OkStatus();
    for (size_t pos = text.find(literal_); pos != std::string_view::npos;
         pos = text.find(literal_, pos + literal_.size())) {
      out.emplace_back(static_cast<uint32_t>(pos), static_cast<uint32_t>(pos + literal_.size()));
    }
    return absl::OkStatus();
  }
  auto* code = static_cast<pcre2_code*>(code_);
  ThreadScratch& s = Scratch();
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t start = 0;
  while (start <= text.size()) {
    const int rc =
        pcre2_match(code, subject, text.size(), start, PCRE2_NO_UTF_CHECK, s.match_data, s.context);
    if (rc == PCRE2_ERROR_NOMATCH) break;
    if (rc < 0) {
      return absl::InternalError(absl::StrFormat("regex `%s`: match failed at byte %d: %s", source_,
                                                 start, Pcre2Error(rc)));
    }
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(s.match_data);
    const size_t b = ov[0], e = ov[1];
    if (e > b) {
      out.emplace_back(static_cast<uint32_t>(b), static_cast<uint32_t>(e));
      start = e;
    } else {
      if (b >= text.size()) break;
      start = b + Utf8SeqLen(static_cast<uint8_t>(text[b]));
    }
  }
  return absl::OkStatus();
}

}  // namespace dsmoe::tokenizer_internal
