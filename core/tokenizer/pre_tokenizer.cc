// Pre-tokenizers: Sequence, Split (regex or literal, five delimiter behaviours, invert),
// ByteLevel (optional GPT-2 regex, prefix space, byte → printable-character mapping), Digits
// and WhitespaceSplit. Semantics follow Hugging Face `tokenizers` (src/pre_tokenizers/*.rs and
// NormalizedString::split in src/tokenizer/normalizer.rs).
#include <algorithm>
#include <array>
#include <string>
#include <vector>

#include "core/tokenizer/components.h"
#include "core/tokenizer/unicode.h"
#include "core/tokenizer/utf8.h"
#include "core/util/status.h"

namespace dsmoe::tokenizer_internal {
namespace {

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// The regex of GPT-2 used by ByteLevel(use_regex=true).
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// Splits [0, n) by `matches` (sorted, non-overlapping) into (span, is_match) pieces, applies the
// behaviour and appends the surviving non-empty spans, shifted by `base`, to `out`.
void ApplyBehavior(uint32_t base, uint32_t n, const std::vector<Span>& matches, bool invert,
                   Behavior behavior, std::vector<Span>& out) {
  struct Piece {
    Span span;
    bool is_match;
  };
  // Small-vector-like reuse is not worth it here; pieces are few per segment on average.
  std::vector<Piece> pieces;
  pieces.reserve(matches.size() * 2 + 1);
  uint32_t prev = 0;
  for (const auto& [b, e] : matches) {
    if (prev != b) pieces.push_back({{prev, b}, invert});
    pieces.push_back({{b, e}, !invert});
    prev = e;
  }
  if (prev != n || pieces.empty()) pieces.push_back({{prev, n}, invert});

  std::vector<Span> result;
  result.reserve(pieces.size());
  switch (behavior) {
    case Behavior::kIsolated:
      for (const auto& p : pieces) result.push_back(p.span);
      break;
    case Behavior::kRemoved:
      for (const auto& p : pieces) {
        if (!p.is_match) result.push_back(p.span);
      }
      break;
    case Behavior::kContiguous: {
      bool previous_match = false;
      for (const auto& p : pieces) {
        if (p.is_match == previous_match && !result.empty()) {
          result.back().second = p.span.second;
        } else {
          result.push_back(p.span);
        }
        previous_match = p.is_match;
      }
      break;
    }
    case Behavior::kMergedWithPrevious: {
      bool previous_match = false;
      for (const auto& p : pieces) {
        if (p.is_match && !previous_match && !result.empty()) {
          result.back().second = p.span.second;
        } else {
          result.push_back(p.span);
        }
        previous_match = p.is_match;
      }
      break;
    }
    case Behavior::kMergedWithNext: {
      bool previous_match = false;
      for (auto it = pieces.rbegin(); it != pieces.rend(); ++it) {
        if (it->is_match && !previous_match && !result.empty()) {
          result.back().first = it->span.first;
        } else {
          result.push_back(it->span);
        }
        previous_match = it->is_match;
      }
      std::reverse(result.begin(), result.end());
      break;
    }
  }
  for (const auto& [b, e] : result) {
    if (e > b) out.emplace_back(base + b, base + e);
  }
}

class SplitPreTokenizer final : public PreTokenizer {
 public:
  SplitPreTokenizer(std::unique_ptr<Matcher> matcher, Behavior behavior, bool invert)
      : matcher_(std::move(matcher)), behavior_(behavior), invert_(invert) {}

  absl::Status PreTokenize(PieceList& pieces, PieceList& scratch) const override {
    scratch.spans.clear();
    std::vector<Span> matches;
    for (const auto& [b, e] : pieces.spans) {
      matches.clear();
      const std::string_view piece(pieces.text.data() + b, e - b);
      DSMOE_RETURN_IF_ERROR(matcher_->FindAll(piece, matches));
      ApplyBehavior(b, e - b, matches, invert_, behavior_, scratch.spans);
    }
    pieces.spans.swap(scratch.spans);
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Matcher> matcher_;
  Behavior behavior_;
  bool invert_;
};

class ByteLevelPreTokenizer final : public PreTokenizer {
 public:
  ByteLevelPreTokenizer(bool add_prefix_space, std::unique_ptr<Matcher> regex)
      : add_prefix_space_(add_prefix_space), regex_(std::move(regex)) {}

  absl::Status PreTokenize(PieceList& pieces, PieceList& scratch) const override {
    const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::Get();
    scratch.text.clear();
    scratch.spans.clear();
    scratch.text.reserve(pieces.text.size() * 2 + pieces.spans.size() * 2);
    std::string prefixed;
    std::vector<Span> sub, matches;
    for (const auto& [b, e] : pieces.spans) {
      std::string_view piece(pieces.text.data() + b, e - b);
      if (add_prefix_space_ && (piece.empty() || piece[0] != ' ')) {
        prefixed.clear();
        prefixed.push_back(' ');  // not assign(" "): GCC 12 -Wrestrict false positive
        prefixed.append(piece);
        piece = prefixed;
      }
      sub.clear();
      if (regex_ != nullptr) {
        matches.clear();
        DSMOE_RETURN_IF_ERROR(regex_->FindAll(piece, matches));
        ApplyBehavior(0, static_cast<uint32_t>(piece.size()), matches, false, Behavior::kIsolated,
                      sub);
      } else if (!piece.empty()) {
        sub.emplace_back(0, static_cast<uint32_t>(piece.size()));
      }
      for (const auto& [sb, se] : sub) {
        const auto start = static_cast<uint32_t>(scratch.text.size());
        for (uint32_t k = sb; k < se; ++k) {
          const auto byte = static_cast<uint8_t>(piece[k]);
          scratch.text.append(alphabet.utf8[byte], alphabet.len[byte]);
        }
        scratch.spans.emplace_back(start, static_cast<uint32_t>(scratch.text.size()));
      }
    }
    std::swap(pieces, scratch);
    return absl::OkStatus();
  }

 private:
  bool add_prefix_space_;
  std::unique_ptr<Matcher> regex_;  // nullptr when use_regex is false
};

// Splits on White_Space, removing it (Hugging Face's WhitespaceSplit).
class WhitespaceSplitPreTokenizer final : public PreTokenizer {
 public:
  absl::Status PreTokenize(PieceList& pieces, PieceList& scratch) const override {
    scratch.spans.clear();
    for (const auto& [b, e] : pieces.spans) {
      const std::string_view piece(pieces.text.data() + b, e - b);
      size_t i = 0, word_start = 0;
      bool in_word = false;
      while (i < piece.size()) {
        const size_t at = i;
        const bool ws = IsWhitespace(NextCodePoint(piece, i));
        if (ws && in_word) scratch.spans.emplace_back(b + word_start, b + at);
        if (!ws && !in_word) word_start = at;
        in_word = !ws;
      }
      if (in_word) scratch.spans.emplace_back(b + word_start, e);
    }
    pieces.spans.swap(scratch.spans);
    return absl::OkStatus();
  }
};

class SequencePreTokenizer final : public PreTokenizer {
 public:
  explicit SequencePreTokenizer(std::vector<std::unique_ptr<PreTokenizer>> stages)
      : stages_(std::move(stages)) {}
  absl::Status PreTokenize(PieceList& pieces, PieceList& scratch) const override {
    for (const auto& s : stages_) DSMOE_RETURN_IF_ERROR(s->PreTokenize(pieces, scratch));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<PreTokenizer>> stages_;
};

absl::StatusOr<Behavior> ParseBehavior(const Json& j, const JsonPath& at) {
  DSMOE_ASSIGN_OR_RETURN(const std::string b, GetString(j, "behavior", at));
  if (b == "Removed") return Behavior::kRemoved;
  if (b == "Isolated") return Behavior::kIsolated;
  if (b == "MergedWithPrevious") return Behavior::kMergedWithPrevious;
  if (b == "MergedWithNext") return Behavior::kMergedWithNext;
  if (b == "Contiguous") return Behavior::kContiguous;
  return at.Field("behavior")
      .Error(
          "expected one of Removed, Isolated, MergedWithPrevious, MergedWithNext, "
          "Contiguous, got '" +
          b + "'");
}

}  // namespace

const ByteLevelAlphabet& ByteLevelAlphabet::Get() {
  static const ByteLevelAlphabet* alphabet = [] {
    auto* a = new ByteLevelAlphabet();
    for (auto& v : a->byte_of) v = -1;
    // Printable bytes keep their own code point; the others are shifted to 256, 257, ... in
    // byte order (GPT-2's bytes_to_unicode).
    int next = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable =
          (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
      const char32_t cp = printable ? static_cast<char32_t>(b) : static_cast<char32_t>(next++);
      std::string s;
      AppendUtf8(cp, s);
      a->len[b] = static_cast<uint8_t>(s.size());
      for (size_t k = 0; k < s.size(); ++k) a->utf8[b][k] = s[k];
      a->utf8[b][s.size()] = '\0';
      a->byte_of[cp] = static_cast<int16_t>(b);
    }
    return a;
  }();
  return *alphabet;
}

absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const Json& j, const JsonPath& at) {
  if (j.is_null()) return std::unique_ptr<PreTokenizer>();
  DSMOE_ASSIGN_OR_RETURN(const std::string type, GetType(j, at));
  if (type == "Sequence") {
    DSMOE_ASSIGN_OR_RETURN(const Json* list, Member(j, "pretokenizers", at));
    if (!list->is_array()) return at.Field("pretokenizers").Error("expected an array");
    std::vector<std::unique_ptr<PreTokenizer>> stages;
    for (size_t i = 0; i < list->size(); ++i) {
      DSMOE_ASSIGN_OR_RETURN(auto stage,
                             MakePreTokenizer((*list)[i], at.Field("pretokenizers").Index(i)));
      if (stage) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequencePreTokenizer>(std::move(stages));
  }
  if (type == "Split") {
    DSMOE_ASSIGN_OR_RETURN(const Json* pattern, Member(j, "pattern", at));
    DSMOE_ASSIGN_OR_RETURN(auto matcher, MakePattern(*pattern, at.Field("pattern")));
    DSMOE_ASSIGN_OR_RETURN(const Behavior behavior, ParseBehavior(j, at));
    DSMOE_ASSIGN_OR_RETURN(const bool invert, GetBool(j, "invert", at, false));
    return std::make_unique<SplitPreTokenizer>(std::move(matcher), behavior, invert);
  }
  if (type == "ByteLevel") {
    DSMOE_ASSIGN_OR_RETURN(const bool add_prefix_space, GetBool(j, "add_prefix_space", at, true));
    DSMOE_ASSIGN_OR_RETURN(const bool use_regex, GetBool(j, "use_regex", at, true));
    std::unique_ptr<Matcher> regex;
    if (use_regex) {
      DSMOE_ASSIGN_OR_RETURN(regex, Matcher::Regex(kGpt2Pattern));
    }
    return std::make_unique<ByteLevelPreTokenizer>(add_prefix_space, std::move(regex));
  }
  if (type == "Digits") {
    DSMOE_ASSIGN_OR_RETURN(const bool individual, GetBool(j, "individual_digits", at, false));
    // Rust's char::is_numeric is the N category; Contiguous merges runs of digits.
    DSMOE_ASSIGN_OR_RETURN(auto matcher, Matcher::Regex(individual ? "\\p{N}" : "\\p{N}+"));
    return std::make_unique<SplitPreTokenizer>(std::move(matcher), Behavior::kIsolated, false);
  }
  if (type == "WhitespaceSplit") return std::make_unique<WhitespaceSplitPreTokenizer>();
  return at.Unsupported("pre-tokenizer", type);
}

}  // namespace dsmoe::tokenizer_internal
