// Normalizers found in current byte-level BPE files (DeepSeek, Llama 2/3, GPT-2 style):
// Sequence, NFC/NFD/NFKC/NFKD, Lowercase, Prepend, Replace, Strip. Semantics follow Hugging Face
// `tokenizers` (src/normalizers/*.rs); normalization data comes from ICU (unicode.h).
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/tokenizer/components.h"
#include "core/tokenizer/strings.h"
#include "core/tokenizer/unicode.h"
#include "core/tokenizer/utf8.h"
#include "core/util/status.h"

namespace dsmoe::tokenizer_internal {
namespace {

class SequenceNormalizer final : public Normalizer {
 public:
  explicit SequenceNormalizer(std::vector<std::unique_ptr<Normalizer>> stages)
      : stages_(std::move(stages)) {}
  absl::Status Normalize(std::string& text) const override {
    for (const auto& s : stages_) DSMOE_RETURN_IF_ERROR(s->Normalize(text));
    return absl::OkStatus();
  }

 private:
  std::vector<std::unique_ptr<Normalizer>> stages_;
};

class UnicodeNormalizer final : public Normalizer {
 public:
  explicit UnicodeNormalizer(NormalForm form) : form_(form) {}
  absl::Status Normalize(std::string& text) const override {
    DSMOE_ASSIGN_OR_RETURN(text, tokenizer_internal::Normalize(form_, text));
    return absl::OkStatus();
  }

 private:
  NormalForm form_;
};

class LowercaseNormalizer final : public Normalizer {
 public:
  absl::Status Normalize(std::string& text) const override {
    DSMOE_ASSIGN_OR_RETURN(text, ToLower(text));
    return absl::OkStatus();
  }
};

// Prepends a string to every non-empty piece (Llama 2 style files prepend "▁").
class PrependNormalizer final : public Normalizer {
 public:
  explicit PrependNormalizer(std::string prefix) : prefix_(std::move(prefix)) {}
  absl::Status Normalize(std::string& text) const override {
    if (!text.empty()) text.insert(0, prefix_);
    return absl::OkStatus();
  }

 private:
  std::string prefix_;
};

// Replaces every non-overlapping match (left to right) of a literal or regex with `content`.
class ReplaceNormalizer final : public Normalizer {
 public:
  ReplaceNormalizer(std::unique_ptr<Matcher> pattern, std::string content)
      : pattern_(std::move(pattern)), content_(std::move(content)) {}
  absl::Status Normalize(std::string& text) const override {
    std::vector<Span> matches;
    DSMOE_RETURN_IF_ERROR(pattern_->FindAll(text, matches));
    if (matches.empty()) return absl::OkStatus();
    std::string out;
    out.reserve(text.size() + matches.size() * content_.size());
    uint32_t prev = 0;
    for (const auto& [b, e] : matches) {
      out.append(text, prev, b - prev);
      out += content_;
      prev = e;
    }
    out.append(text, prev, std::string::npos);
    text = std::move(out);
    return absl::OkStatus();
  }

 private:
  std::unique_ptr<Matcher> pattern_;
  std::string content_;
};

// Removes leading and/or trailing White_Space characters.
class StripNormalizer final : public Normalizer {
 public:
  StripNormalizer(bool left, bool right) : left_(left), right_(right) {}
  absl::Status Normalize(std::string& text) const override {
    size_t b = 0, e = text.size();
    if (left_) {
      while (b < e) {
        size_t next = b;
        if (!IsWhitespace(NextCodePoint(text, next))) break;
        b = next;
      }
    }
    if (right_) {
      while (e > b) {
        size_t prev = e;
        if (!IsWhitespace(PrevCodePoint(text, prev))) break;
        e = prev;
      }
    }
    text = text.substr(b, e - b);
    return absl::OkStatus();
  }

 private:
  bool left_, right_;
};

}  // namespace

// A {"String": s} or {"Regex": r} pattern object (shared by Split, Replace normalizer/decoder).
absl::StatusOr<std::unique_ptr<Matcher>> MakePattern(const Json& j, const JsonPath& at) {
  if (!j.is_object() || j.size() != 1)
    return at.Error(R"(expected {"String": ...} or {"Regex": ...})");
  if (const Json* s = OptionalMember(j, "String"); s != nullptr && s->is_string()) {
    return Matcher::Literal(s->get<std::string>());
  }
  if (const Json* r = OptionalMember(j, "Regex"); r != nullptr && r->is_string()) {
    auto m = Matcher::Regex(r->get<std::string>());
    if (!m.ok()) return at.Field("Regex").Error(std::string(m.status().message()));
    return m;
  }
  return at.Error(R"(expected {"String": "..."} or {"Regex": "..."})");
}

absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const Json& j, const JsonPath& at) {
  if (j.is_null()) return std::unique_ptr<Normalizer>();
  DSMOE_ASSIGN_OR_RETURN(const std::string type, GetType(j, at));
  if (type == "Sequence") {
    DSMOE_ASSIGN_OR_RETURN(const Json* list, Member(j, "normalizers", at));
    if (!list->is_array()) return at.Field("normalizers").Error("expected an array");
    std::vector<std::unique_ptr<Normalizer>> stages;
    for (size_t i = 0; i < list->size(); ++i) {
      DSMOE_ASSIGN_OR_RETURN(auto stage,
                             MakeNormalizer((*list)[i], at.Field("normalizers").Index(i)));
      if (stage) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequenceNormalizer>(std::move(stages));
  }
  if (type == "NFC") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfc);
  if (type == "NFD") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfd);
  if (type == "NFKC") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfkc);
  if (type == "NFKD") return std::make_unique<UnicodeNormalizer>(NormalForm::kNfkd);
  if (type == "Lowercase") return std::make_unique<LowercaseNormalizer>();
  if (type == "Prepend") {
    DSMOE_ASSIGN_OR_RETURN(std::string prefix, GetString(j, "prepend", at));
    return std::make_unique<PrependNormalizer>(std::move(prefix));
  }
  if (type == "Replace") {
    DSMOE_ASSIGN_OR_RETURN(const Json* pattern, Member(j, "pattern", at));
    DSMOE_ASSIGN_OR_RETURN(auto matcher, MakePattern(*pattern, at.Field("pattern")));
    DSMOE_ASSIGN_OR_RETURN(std::string content, GetString(j, "content", at));
    return std::make_unique<ReplaceNormalizer>(std::move(matcher), std::move(content));
  }
  if (type == "Strip") {
    DSMOE_ASSIGN_OR_RETURN(const bool left, GetBool(j, "strip_left", at, true));
    DSMOE_ASSIGN_OR_RETURN(const bool right, GetBool(j, "strip_right", at, true));
    return std::make_unique<StripNormalizer>(left, right);
  }
  return at.Unsupported("normalizer", type);
}

}  // namespace dsmoe::tokenizer_internal
