#include "core/tokenizer/utf8.h"

#include "absl/strings/str_format.h"

namespace dsmoe::tokenizer_internal {
namespace {

// Length of the longest valid prefix (0..4) of a UTF-8 sequence starting at p[0], looking at no
// more than `avail` bytes, and whether that prefix is a complete sequence. This follows the
// table of well-formed byte sequences in the Unicode standard (ch. 3, table 3-7), which is also
// what Rust's from_utf8_lossy uses to find "maximal subparts".
struct SeqCheck {
  int valid_len;   // bytes that belong to a (possibly incomplete) well-formed prefix; >= 1
  bool complete;   // valid_len bytes form a whole code point
  bool truncated;  // the prefix stopped only because input ended
};

inline SeqCheck CheckSeq(const uint8_t* p, size_t avail) {
  const uint8_t b = p[0];
  if (b < 0x80) return {1, true, false};
  int need;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b >= 0xC2 && b <= 0xDF) {
    need = 1;
  } else if (b == 0xE0) {
    need = 2, lo = 0xA0;
  } else if ((b >= 0xE1 && b <= 0xEC) || b == 0xEE || b == 0xEF) {
    need = 2;
  } else if (b == 0xED) {
    need = 2, hi = 0x9F;
  } else if (b == 0xF0) {
    need = 3, lo = 0x90;
  } else if (b >= 0xF1 && b <= 0xF3) {
    need = 3;
  } else if (b == 0xF4) {
    need = 3, hi = 0x8F;
  } else {
    return {1, false, false};  // 0x80..0xC1, 0xF5..0xFF can never start a sequence
  }
  int len = 1;
  for (int k = 1; k <= need; ++k) {
    if (static_cast<size_t>(k) >= avail) return {len, false, true};
    const uint8_t c = p[k];
    const uint8_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
    if (c < l || c > h) return {len, false, false};
    ++len;
  }
  return {len, true, false};
}

}  // namespace

absl::Status ValidateUtf8(std::string_view text, std::string_view what) {
  const auto* p = reinterpret_cast<const uint8_t*>(text.data());
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    // ASCII fast path, 8 bytes at a time.
    while (i + 8 <= n) {
      uint64_t w;
      __builtin_memcpy(&w, p + i, 8);
      if (w & 0x8080808080808080ull) break;
      i += 8;
    }
    if (i >= n) break;
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const SeqCheck c = CheckSeq(p + i, n - i);
    if (!c.complete) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s is not valid UTF-8: %s sequence starting with byte 0x%02X at byte offset %d",
          std::string(what), c.truncated ? "truncated" : "ill-formed", p[i], i));
    }
    i += c.valid_len;
  }
  return absl::OkStatus();
}

bool IsValidUtf8(std::string_view bytes) { return ValidateUtf8(bytes, "").ok(); }

char32_t PrevCodePoint(std::string_view s, size_t& i) {
  size_t j = i;
  do {
    --j;
  } while (j > 0 && (static_cast<uint8_t>(s[j]) & 0xC0) == 0x80);
  size_t k = j;
  i = j;
  return NextCodePoint(s, k);
}

void AppendUtf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t AppendUtf8Lossy(std::string_view bytes, std::string& out, bool hold_incomplete_tail) {
  const auto* p = reinterpret_cast<const uint8_t*>(bytes.data());
  const size_t n = bytes.size();
  size_t i = 0, run_start = 0;  // [run_start, i) is valid and not yet copied
  while (i < n) {
    if (p[i] < 0x80) {
      ++i;
      continue;
    }
    const SeqCheck c = CheckSeq(p + i, n - i);
    if (c.complete) {
      i += c.valid_len;
      continue;
    }
    out.append(bytes.data() + run_start, i - run_start);
    if (c.truncated && hold_incomplete_tail) return n - i;
    out.append(kReplacementChar);
    i += c.valid_len;
    run_start = i;
  }
  out.append(bytes.data() + run_start, n - run_start);
  return 0;
}

}  // namespace dsmoe::tokenizer_internal
