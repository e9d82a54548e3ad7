// Decoders: ByteLevel, Sequence, Replace, Fuse, Strip, ByteFallback — the decode_chain
// semantics of Hugging Face `tokenizers` (src/decoders/*.rs).
#include <string>
#include <vector>

#include "absl/strings/str_join.h"
#include "core/tokenizer/components.h"
#include "core/tokenizer/utf8.h"
#include "core/util/status.h"

namespace dsmoe::tokenizer_internal {
namespace {

// Maps each token's characters back to bytes (a token with a character outside the alphabet,
// e.g. an added token, contributes its own UTF-8 bytes), then converts all bytes lossily.
class ByteLevelDecoder final : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::Get();
    std::string bytes;
    for (const std::string& t : tokens) {
      const size_t mark = bytes.size();
      bool all_mapped = true;
      for (size_t i = 0; i < t.size();) {
        const char32_t cp = NextCodePoint(t, i);
        const int b = cp < 0x144 ? alphabet.byte_of[cp] : -1;
        if (b < 0) {
          all_mapped = false;
          break;
        }
        bytes.push_back(static_cast<char>(b));
      }
      if (!all_mapped) {
        bytes.resize(mark);
        bytes += t;
      }
    }
    std::string text;
    AppendUtf8Lossy(bytes, text);
    tokens.assign(1, std::move(text));
    return absl::OkStatus();
  }
  bool ConcatenationSafe() const override { return true; }
  bool Joins() const override { return true; }
};

class SequenceDecoder final : public Decoder {
 public:
  explicit SequenceDecoder(std::vector<std::unique_ptr<Decoder>> stages)
      : stages_(std::move(stages)) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (const auto& s : stages_) DSMOE_RETURN_IF_ERROR(s->DecodeChain(tokens));
    return absl::OkStatus();
  }
  bool ConcatenationSafe() const override {
    // A token-local stage after a joining one sees text across token boundaries.
    bool joined = false;
    for (const auto& s : stages_) {
      if (!s->ConcatenationSafe() || (joined && !s->Joins())) return false;
      joined = joined || s->Joins();
    }
    return true;
  }
  bool Joins() const override {
    for (const auto& s : stages_) {
      if (s->Joins()) return true;
    }
    return false;
  }
  bool GroupsByteTokens() const override {
    for (const auto& s : stages_) {
      if (s->GroupsByteTokens()) return true;
    }
    return false;
  }
  int TrailingStripChars() const override {
    int n = 0;
    for (const auto& s : stages_) n = std::max(n, s->TrailingStripChars());
    return n;
  }

 private:
  std::vector<std::unique_ptr<Decoder>> stages_;
};

class ReplaceDecoder final : public Decoder {
 public:
  ReplaceDecoder(std::unique_ptr<Matcher> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::vector<Span> matches;
    for (std::string& t : tokens) {
      matches.clear();
      DSMOE_RETURN_IF_ERROR(pattern_->FindAll(t, matches));
      if (matches.empty()) continue;
      std::string out;
      uint32_t prev = 0;
      for (const auto& [b, e] : matches) {
        out.append(t, prev, b - prev);
        out += content_;
        prev = e;
      }
      out.append(t, prev, std::string::npos);
      t = std::move(out);
    }
    return absl::OkStatus();
  }
  bool ConcatenationSafe() const override { return true; }  // token-local

 private:
  std::unique_ptr<Matcher> pattern_;
  std::string content_;
};

class FuseDecoder final : public Decoder {
 public:
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::string joined = absl::StrJoin(tokens, "");
    tokens.assign(1, std::move(joined));
    return absl::OkStatus();
  }
  bool ConcatenationSafe() const override { return true; }
  bool Joins() const override { return true; }
};

// Removes up to `start` leading and `stop` trailing `content` characters from each token.
class StripDecoder final : public Decoder {
 public:
  StripDecoder(char32_t content, int start, int stop)
      : content_(content), start_(start), stop_(stop) {}
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    for (std::string& t : tokens) {
      size_t b = 0, e = t.size();
      for (int k = 0; k < start_ && b < e; ++k) {
        size_t next = b;
        if (NextCodePoint(t, next) != content_) break;
        b = next;
      }
      for (int k = 0; k < stop_ && e > b; ++k) {
        size_t prev = e;
        if (PrevCodePoint(t, prev) != content_) break;
        e = prev;
      }
      t = t.substr(b, e - b);
    }
    return absl::OkStatus();
  }
  int TrailingStripChars() const override { return stop_; }

 private:
  char32_t content_;
  int start_, stop_;
};

// Turns runs of <0xXX> tokens into their UTF-8 text, or one U+FFFD per byte if invalid.
class ByteFallbackDecoder final : public Decoder {
 public:
  bool GroupsByteTokens() const override { return true; }
  absl::Status DecodeChain(std::vector<std::string>& tokens) const override {
    std::vector<std::string> out;
    out.reserve(tokens.size());
    std::string pending;
    auto flush = [&] {
      if (pending.empty()) return;
      if (IsValidUtf8(pending)) {
        out.push_back(pending);
      } else {
        for (size_t k = 0; k < pending.size(); ++k) out.emplace_back(kReplacementChar);
      }
      pending.clear();
    };
    for (std::string& t : tokens) {
      int byte = -1;
      if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>')
        byte = ParseHexByte(t[3], t[4]);
      if (byte >= 0) {
        pending.push_back(static_cast<char>(byte));
      } else {
        flush();
        out.push_back(std::move(t));
      }
    }
    flush();
    tokens = std::move(out);
    return absl::OkStatus();
  }

 private:
  // u8::from_str_radix(.., 16) on two characters: hex digits, or '+' then one hex digit.
  static int ParseHexByte(char a, char b) {
    auto hex = [](char c) -> int {
      if (c >= '0' && c <= '9') return c - '0';
      if (c >= 'a' && c <= 'f') return c - 'a' + 10;
      if (c >= 'A' && c <= 'F') return c - 'A' + 10;
      return -1;
    };
    const int hb = hex(b);
    if (hb < 0) return -1;
    if (a == '+') return hb;
    const int ha = hex(a);
    return ha < 0 ? -1 : ha * 16 + hb;
  }
};

}  // namespace

absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const Json& j, const JsonPath& at) {
  if (j.is_null()) return std::unique_ptr<Decoder>();
  DSMOE_ASSIGN_OR_RETURN(const std::string type, GetType(j, at));
  if (type == "ByteLevel") return std::make_unique<ByteLevelDecoder>();
  if (type == "Sequence") {
    DSMOE_ASSIGN_OR_RETURN(const Json* list, Member(j, "decoders", at));
    if (!list->is_array()) return at.Field("decoders").Error("expected an array");
    std::vector<std::unique_ptr<Decoder>> stages;
    for (size_t i = 0; i < list->size(); ++i) {
      DSMOE_ASSIGN_OR_RETURN(auto stage, MakeDecoder((*list)[i], at.Field("decoders").Index(i)));
      if (stage) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequenceDecoder>(std::move(stages));
  }
  if (type == "Replace") {
    DSMOE_ASSIGN_OR_RETURN(const Json* pattern, Member(j, "pattern", at));
    DSMOE_ASSIGN_OR_RETURN(auto matcher, MakePattern(*pattern, at.Field("pattern")));
    DSMOE_ASSIGN_OR_RETURN(std::string content, GetString(j, "content", at));
    return std::make_unique<ReplaceDecoder>(std::move(matcher), std::move(content));
  }
  if (type == "Fuse") return std::make_unique<FuseDecoder>();
  if (type == "ByteFallback") return std::make_unique<ByteFallbackDecoder>();
  if (type == "Strip") {
    DSMOE_ASSIGN_OR_RETURN(const std::string content, GetString(j, "content", at));
    size_t i = 0;
    if (content.empty() || !IsValidUtf8(content) ||
        (NextCodePoint(content, i), i != content.size())) {
      return at.Field("content").Error("expected a single character");
    }
    i = 0;
    const char32_t c = NextCodePoint(content, i);
    DSMOE_ASSIGN_OR_RETURN(const int64_t start, GetInt(j, "start", at, 0));
    DSMOE_ASSIGN_OR_RETURN(const int64_t stop, GetInt(j, "stop", at, 0));
    if (start < 0 || stop < 0 || start > 1024 || stop > 1024)
      return at.Error("start/stop out of range");
    return std::make_unique<StripDecoder>(c, static_cast<int>(start), static_cast<int>(stop));
  }
  return at.Unsupported("decoder", type);
}

}  // namespace dsmoe::tokenizer_internal
