#include "core/tokenizer/unicode.h"

#include <unicode/utf16.h>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "core/tokenizer/strings.h"
#include "core/tokenizer/utf8.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/uchar.h>
#include <unicode/unorm2.h>
#include <unicode/ustring.h>
#include <unicode/uversion.h>

#include <cstdio>
#include <map>

#include "absl/strings/str_cat.h"

namespace dsmoe::tokenizer_internal {
namespace {

absl::StatusOr<std::u16string> ToUtf16(std::string_view text) {
  std::u16string out(text.size() + 1, u'\0');
  int32_t len = 0;
  UErrorCode err = U_ZERO_ERROR;
  u_strFromUTF8(reinterpret_cast<UChar*>(out.data()), static_cast<int32_t>(out.size()), &len,
                text.data(), static_cast<int32_t>(text.size()), &err);
  if (U_FAILURE(err))
    return absl::InvalidArgumentError(Cat("ICU UTF-8 → UTF-16: ", u_errorName(err)));
  out.resize(len);
  return out;
}

absl::StatusOr<std::string> ToUtf8(const UChar* s, int32_t n) {
  std::string out(static_cast<size_t>(n) * 3 + 1, '\0');
  int32_t len = 0;
  UErrorCode err = U_ZERO_ERROR;
  u_strToUTF8(out.data(), static_cast<int32_t>(out.size()), &len, s, n, &err);
  if (U_FAILURE(err)) return absl::InternalError(Cat("ICU UTF-16 → UTF-8: ", u_errorName(err)));
  out.resize(len);
  return out;
}

bool IsAscii(std::string_view s) {
  for (unsigned char c : s) {
    if (c >= 0x80) return false;
  }
  return true;
}

// Bit mask (U_GC_*_MASK) of the general categories a \p{..} name stands for; 0 if unknown.
uint32_t GcMask(std::string_view name) {
  static const std::map<std::string_view, uint32_t> kMasks = {
      {"L", U_GC_L_MASK},   {"Lu", U_GC_LU_MASK}, {"Ll", U_GC_LL_MASK}, {"Lt", U_GC_LT_MASK},
      {"Lm", U_GC_LM_MASK}, {"Lo", U_GC_LO_MASK}, {"M", U_GC_M_MASK},   {"Mn", U_GC_MN_MASK},
      {"Mc", U_GC_MC_MASK}, {"Me", U_GC_ME_MASK}, {"N", U_GC_N_MASK},   {"Nd", U_GC_ND_MASK},
      {"Nl", U_GC_NL_MASK}, {"No", U_GC_NO_MASK}, {"P", U_GC_P_MASK},   {"Pc", U_GC_PC_MASK},
      {"Pd", U_GC_PD_MASK}, {"Ps", U_GC_PS_MASK}, {"Pe", U_GC_PE_MASK}, {"Pi", U_GC_PI_MASK},
      {"Pf", U_GC_PF_MASK}, {"Po", U_GC_PO_MASK}, {"S", U_GC_S_MASK},   {"Sm", U_GC_SM_MASK},
      {"Sc", U_GC_SC_MASK}, {"Sk", U_GC_SK_MASK}, {"So", U_GC_SO_MASK}, {"Z", U_GC_Z_MASK},
      {"Zs", U_GC_ZS_MASK}, {"Zl", U_GC_ZL_MASK}, {"Zp", U_GC_ZP_MASK},
  };
  auto it = kMasks.find(name);
  return it == kMasks.end() ? 0 : it->second;
}

// Code points assigned after PCRE2's Unicode version, with their ICU general category.
const std::vector<std::pair<char32_t, int>>& NewerCodePoints() {
  static const auto* table = [] {
    auto* t = new std::vector<std::pair<char32_t, int>>();
    char buf[32] = {};
    pcre2_config(PCRE2_CONFIG_UNICODE_VERSION, buf);
    int major = 0, minor = 0;
    std::sscanf(buf, "%d.%d", &major, &minor);
    for (UChar32 c = 0; c <= 0x10FFFF; ++c) {
      UVersionInfo age;
      u_charAge(c, age);
      if (age[0] == 0 && age[1] == 0) continue;  // unassigned in ICU too
      if (age[0] > major || (age[0] == major && age[1] > minor)) {
        t->emplace_back(static_cast<char32_t>(c), u_charType(c));
      }
    }
    return t;
  }();
  return *table;
}

}  // namespace

bool IsWhitespace(char32_t c) {
  return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_WHITE_SPACE);
}

bool IsWordChar(char32_t c) {
  const auto u = static_cast<UChar32>(c);
  return u_hasBinaryProperty(u, UCHAR_ALPHABETIC) ||
         (U_GET_GC_MASK(u) & (U_GC_M_MASK | U_GC_ND_MASK | U_GC_PC_MASK)) ||
         u_hasBinaryProperty(u, UCHAR_JOIN_CONTROL);
}

namespace {
// Normalizes one chunk that contains no code point newer than the reference's tables.
absl::StatusOr<std::string> NormalizeChunk(NormalForm form, std::string_view text);

bool NewerThanReferenceNormalization(char32_t c) {
  UVersionInfo age;
  u_charAge(static_cast<UChar32>(c), age);
  return age[0] > 11 || (age[0] == 11 && age[1] > 0);
}
}  // namespace

absl::StatusOr<std::string> Normalize(NormalForm form, std::string_view text) {
  if (IsAscii(text)) return std::string(text);  // ASCII is invariant under all four forms
  std::string out;
  size_t chunk = 0, i = 0;
  while (i < text.size()) {
    const size_t at = i;
    const char32_t c = NextCodePoint(text, i);
    if (c < 0x80 || !NewerThanReferenceNormalization(c)) continue;
    auto n = NormalizeChunk(form, text.substr(chunk, at - chunk));
    if (!n.ok()) return n.status();
    out += *n;
    out.append(text.substr(at, i - at));
    chunk = i;
  }
  if (chunk == 0) return NormalizeChunk(form, text);
  auto n = NormalizeChunk(form, text.substr(chunk));
  if (!n.ok()) return n.status();
  out += *n;
  return out;
}

namespace {
absl::StatusOr<std::string> NormalizeChunk(NormalForm form, std::string_view text) {
  if (IsAscii(text)) return std::string(text);
  UErrorCode err = U_ZERO_ERROR;
  const UNormalizer2* norm = nullptr;
  switch (form) {
    case NormalForm::kNfc:
      norm = unorm2_getNFCInstance(&err);
      break;
    case NormalForm::kNfd:
      norm = unorm2_getNFDInstance(&err);
      break;
    case NormalForm::kNfkc:
      norm = unorm2_getNFKCInstance(&err);
      break;
    case NormalForm::kNfkd:
      norm = unorm2_getNFKDInstance(&err);
      break;
  }
  if (U_FAILURE(err)) return absl::InternalError(Cat("ICU normalizer: ", u_errorName(err)));
  auto src = ToUtf16(text);
  if (!src.ok()) return src.status();
  // Decomposition can grow text (NFKD of U+FDFA is 18 code units); retry with the size ICU asks.
  std::u16string dst(src->size() * 3 + 16, u'\0');
  for (int attempt = 0; attempt < 2; ++attempt) {
    err = U_ZERO_ERROR;
    const int32_t n = unorm2_normalize(
        norm, reinterpret_cast<const UChar*>(src->data()), static_cast<int32_t>(src->size()),
        reinterpret_cast<UChar*>(dst.data()), static_cast<int32_t>(dst.size()), &err);
    if (err == U_BUFFER_OVERFLOW_ERROR) {
      dst.assign(static_cast<size_t>(n) + 1, u'\0');
      continue;
    }
    if (U_FAILURE(err)) return absl::InternalError(Cat("ICU normalize: ", u_errorName(err)));
    return ToUtf8(reinterpret_cast<const UChar*>(dst.data()), n);
  }
  return absl::InternalError("ICU normalize: buffer size did not converge");
}
}  // namespace

namespace {
// Lower-case mappings the reference (Rust std, Unicode 16+) has and ICU 72 (Unicode 15) lacks:
// letters added in Unicode 16. Obtained by comparing the reference's Lowercase normalizer with
// ToLower over all code points (55 differences, all listed here).
char32_t NewerLowercase(char32_t c) {
  struct Range {
    char32_t first, last;
    int32_t delta;
  };
  static constexpr Range kRanges[] = {
      {0x1C89, 0x1C89, 1},    {0xA7CB, 0xA7CB, -42343}, {0xA7CC, 0xA7CC, 1},
      {0xA7CE, 0xA7CE, 1},    {0xA7D2, 0xA7D2, 1},      {0xA7D4, 0xA7D4, 1},
      {0xA7DA, 0xA7DA, 1},    {0xA7DC, 0xA7DC, -42561}, {0x10D50, 0x10D65, 32},
      {0x16EA0, 0x16EB8, 27},
  };
  if (c < 0x1C89) return 0;
  for (const Range& r : kRanges) {
    if (c >= r.first && c <= r.last)
      return static_cast<char32_t>(static_cast<int32_t>(c) + r.delta);
  }
  return 0;
}
}  // namespace

absl::StatusOr<std::string> ToLower(std::string_view text) {
  std::string out;
  out.reserve(text.size());
  size_t i = 0;
  while (i < text.size()) {
    const auto b = static_cast<unsigned char>(text[i]);
    if (b < 0x80) {
      out.push_back(b >= 'A' && b <= 'Z' ? static_cast<char>(b - 'A' + 'a') : static_cast<char>(b));
      ++i;
      continue;
    }
    const char32_t c = NextCodePoint(text, i);
    if (const char32_t mapped = NewerLowercase(c)) {
      AppendUtf8(mapped, out);
      continue;
    }
    // Full (possibly multi-character) mapping of the character alone, without context.
    UChar src[2];
    int32_t src_len = 0;
    U16_APPEND_UNSAFE(src, src_len, static_cast<UChar32>(c));
    UChar dst[8];
    UErrorCode err = U_ZERO_ERROR;
    const int32_t n = u_strToLower(dst, 8, src, src_len, "", &err);
    if (U_FAILURE(err)) return absl::InternalError(Cat("ICU lowercase: ", u_errorName(err)));
    auto utf8 = ToUtf8(dst, n);
    if (!utf8.ok()) return utf8.status();
    out += *utf8;
  }
  return out;
}

bool IsGeneralCategoryName(std::string_view name) { return GcMask(name) != 0; }

const std::vector<std::pair<char32_t, char32_t>>& CategoryDelta(std::string_view gc_name) {
  static absl::Mutex mu;
  static auto* cache =
      new std::map<std::string, std::vector<std::pair<char32_t, char32_t>>, std::less<>>();
  absl::MutexLock lock(&mu);
  auto it = cache->find(gc_name);
  if (it != cache->end()) return it->second;
  std::vector<std::pair<char32_t, char32_t>> ranges;
  if (const uint32_t mask = GcMask(gc_name); mask != 0) {
    for (const auto& [cp, gc] : NewerCodePoints()) {
      if (!(U_MASK(gc) & mask)) continue;
      if (!ranges.empty() && ranges.back().second + 1 == cp) {
        ranges.back().second = cp;
      } else {
        ranges.emplace_back(cp, cp);
      }
    }
  }
  return cache->emplace(std::string(gc_name), std::move(ranges)).first->second;
}

}  // namespace dsmoe::tokenizer_internal
