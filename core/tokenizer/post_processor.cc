// Post-processors for a single sequence: ByteLevel (ids unchanged; it only adjusts offsets),
// TemplateProcessing (the "single" template), RobertaProcessing / BertProcessing (cls $A sep)
// and Sequence. Pair templates are parsed for validation but never applied: dsmoe encodes one
// sequence at a time.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "core/tokenizer/components.h"
#include "core/tokenizer/strings.h"
#include "core/util/status.h"

namespace dsmoe::tokenizer_internal {
namespace {

class AffixProcessor final : public PostProcessor {
 public:
  AffixProcessor(std::vector<int32_t> prefix, std::vector<int32_t> suffix)
      : prefix_(std::move(prefix)), suffix_(std::move(suffix)) {}
  absl::Status Process(std::vector<int32_t>& ids) const override {
    ids.insert(ids.begin(), prefix_.begin(), prefix_.end());
    ids.insert(ids.end(), suffix_.begin(), suffix_.end());
    return absl::OkStatus();
  }
  int32_t MaxId() const override {
    int32_t m = -1;
    for (int32_t id : prefix_) m = std::max(m, id);
    for (int32_t id : suffix_) m = std::max(m, id);
    return m;
  }

 private:
  std::vector<int32_t> prefix_, suffix_;
};

class IdentityProcessor final : public PostProcessor {
 public:
  absl::Status Process(std::vector<int32_t>&) const override { return absl::OkStatus(); }
};

class SequenceProcessor final : public PostProcessor {
 public:
  explicit SequenceProcessor(std::vector<std::unique_ptr<PostProcessor>> stages)
      : stages_(std::move(stages)) {}
  absl::Status Process(std::vector<int32_t>& ids) const override {
    for (const auto& s : stages_) DSMOE_RETURN_IF_ERROR(s->Process(ids));
    return absl::OkStatus();
  }
  int32_t MaxId() const override {
    int32_t m = -1;
    for (const auto& s : stages_) m = std::max(m, s->MaxId());
    return m;
  }

 private:
  std::vector<std::unique_ptr<PostProcessor>> stages_;
};

// Parses TemplateProcessing's "single" template into prefix ids + $A + suffix ids.
absl::StatusOr<std::unique_ptr<PostProcessor>> MakeTemplate(const Json& j, const JsonPath& at) {
  DSMOE_ASSIGN_OR_RETURN(const Json* specials, Member(j, "special_tokens", at));
  if (!specials->is_object()) return at.Field("special_tokens").Error("expected an object");
  absl::flat_hash_map<std::string, std::vector<int32_t>> special_ids;
  for (auto it = specials->begin(); it != specials->end(); ++it) {
    const JsonPath here = at.Field("special_tokens").Field(it.key());
    DSMOE_ASSIGN_OR_RETURN(const Json* ids, Member(it.value(), "ids", here));
    if (!ids->is_array()) return here.Field("ids").Error("expected an array of ids");
    std::vector<int32_t>& v = special_ids[it.key()];
    for (const Json& id : *ids) {
      // The same bound as the model's vocabulary: ids beyond it would not fit an int32 (and
      // size a model's embedding table from them).
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > (16 << 20))
        return here.Field("ids").Error("expected ids in [0, 16M]");
      v.push_back(static_cast<int32_t>(id.get<int64_t>()));
    }
  }
  DSMOE_ASSIGN_OR_RETURN(const Json* single, Member(j, "single", at));
  if (!single->is_array()) return at.Field("single").Error("expected an array of template pieces");
  std::vector<int32_t> prefix, suffix;
  int sequences = 0;
  for (size_t i = 0; i < single->size(); ++i) {
    const Json& piece = (*single)[i];
    const JsonPath here = at.Field("single").Index(i);
    if (const Json* s = OptionalMember(piece, "SpecialToken")) {
      DSMOE_ASSIGN_OR_RETURN(const std::string id, GetString(*s, "id", here.Field("SpecialToken")));
      auto it = special_ids.find(id);
      if (it == special_ids.end())
        return here.Error(Cat("special token '", id, "' is not in special_tokens"));
      auto& dst = sequences == 0 ? prefix : suffix;
      dst.insert(dst.end(), it->second.begin(), it->second.end());
    } else if (const Json* q = OptionalMember(piece, "Sequence")) {
      DSMOE_ASSIGN_OR_RETURN(const std::string id, GetString(*q, "id", here.Field("Sequence")));
      if (id != "A") return here.Error("the single-sequence template may only use sequence A");
      ++sequences;
    } else {
      return here.Error(R"(expected {"SpecialToken": ...} or {"Sequence": ...})");
    }
  }
  if (sequences != 1) return at.Field("single").Error("expected exactly one $A in the template");
  return MakeAffixProcessor(std::move(prefix), std::move(suffix));
}

// RobertaProcessing / BertProcessing: {"cls": ["<s>", 0], "sep": ["</s>", 2], ...}.
absl::StatusOr<int32_t> TokenPairId(const Json& j, std::string_view key, const JsonPath& at) {
  DSMOE_ASSIGN_OR_RETURN(const Json* v, Member(j, key, at));
  if (!v->is_array() || v->size() != 2 || !(*v)[1].is_number_integer()) {
    return at.Field(key).Error("expected [\"token\", id]");
  }
  return static_cast<int32_t>((*v)[1].get<int64_t>());
}

}  // namespace

std::unique_ptr<PostProcessor> MakeAffixProcessor(std::vector<int32_t> prefix,
                                                  std::vector<int32_t> suffix) {
  return std::make_unique<AffixProcessor>(std::move(prefix), std::move(suffix));
}

absl::StatusOr<std::unique_ptr<PostProcessor>> MakePostProcessor(const Json& j,
                                                                 const JsonPath& at) {
  if (j.is_null()) return std::unique_ptr<PostProcessor>();
  DSMOE_ASSIGN_OR_RETURN(const std::string type, GetType(j, at));
  if (type == "ByteLevel") return std::make_unique<IdentityProcessor>();
  if (type == "TemplateProcessing") return MakeTemplate(j, at);
  if (type == "RobertaProcessing" || type == "BertProcessing") {
    DSMOE_ASSIGN_OR_RETURN(const int32_t cls, TokenPairId(j, "cls", at));
    DSMOE_ASSIGN_OR_RETURN(const int32_t sep, TokenPairId(j, "sep", at));
    return MakeAffixProcessor({cls}, {sep});
  }
  if (type == "Sequence") {
    DSMOE_ASSIGN_OR_RETURN(const Json* list, Member(j, "processors", at));
    if (!list->is_array()) return at.Field("processors").Error("expected an array");
    std::vector<std::unique_ptr<PostProcessor>> stages;
    for (size_t i = 0; i < list->size(); ++i) {
      DSMOE_ASSIGN_OR_RETURN(auto stage,
                             MakePostProcessor((*list)[i], at.Field("processors").Index(i)));
      if (stage) stages.push_back(std::move(stage));
    }
    return std::make_unique<SequenceProcessor>(std::move(stages));
  }
  return at.Unsupported("post-processor", type);
}

}  // namespace dsmoe::tokenizer_internal
