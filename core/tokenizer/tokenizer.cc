// Loading and the encode/decode pipelines (the order of stages is that of Hugging Face's
// TokenizerImpl::encode_single_sequence and TokenizerImpl::decode).
#include "core/tokenizer/tokenizer.h"

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/tokenizer/added_vocabulary.h"
#include "core/tokenizer/components.h"
#include "core/tokenizer/json_util.h"
#include "core/tokenizer/strings.h"
#include "core/tokenizer/utf8.h"
#include "core/util/status.h"

namespace dsmoe {

using tokenizer_internal::AddedTokenSpec;
using tokenizer_internal::AddedVocabulary;
using tokenizer_internal::Cat;
using tokenizer_internal::Json;
using tokenizer_internal::JsonPath;
using tokenizer_internal::PieceList;
using tokenizer_internal::SegmentPiece;

namespace {

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(Cat("cannot open ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return absl::DataLossError(Cat("error reading ", path));
  return std::move(ss).str();
}

absl::StatusOr<Json> ParseJson(std::string_view text, std::string_view source) {
  try {
    return Json::parse(text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(Cat(source, ": not valid JSON: ", e.what()));
  }
}

absl::StatusOr<std::vector<AddedTokenSpec>> ParseAddedTokens(const Json& root,
                                                             const JsonPath& root_at) {
  std::vector<AddedTokenSpec> out;
  const Json* list = tokenizer_internal::OptionalMember(root, "added_tokens");
  if (list == nullptr) return out;
  const JsonPath at = root_at.Field("added_tokens");
  if (!list->is_array()) return at.Error("expected an array");
  for (size_t i = 0; i < list->size(); ++i) {
    const Json& t = (*list)[i];
    const JsonPath here = at.Index(i);
    AddedTokenSpec s;
    DSMOE_ASSIGN_OR_RETURN(s.content, tokenizer_internal::GetString(t, "content", here));
    DSMOE_RETURN_IF_ERROR(
        tokenizer_internal::ValidateUtf8(s.content, Cat(here.source, ": ", here.path)));
    DSMOE_ASSIGN_OR_RETURN(s.special, tokenizer_internal::GetBool(t, "special", here, false));
    DSMOE_ASSIGN_OR_RETURN(s.normalized,
                           tokenizer_internal::GetBool(t, "normalized", here, !s.special));
    DSMOE_ASSIGN_OR_RETURN(s.lstrip, tokenizer_internal::GetBool(t, "lstrip", here, false));
    DSMOE_ASSIGN_OR_RETURN(s.rstrip, tokenizer_internal::GetBool(t, "rstrip", here, false));
    DSMOE_ASSIGN_OR_RETURN(s.single_word,
                           tokenizer_internal::GetBool(t, "single_word", here, false));
    out.push_back(std::move(s));
  }
  return out;
}

// A token in tokenizer_config.json: "text" or {"content": "text", ...}; null means absent.
absl::StatusOr<std::optional<std::string>> ConfigToken(const Json& root, std::string_view key,
                                                       const JsonPath& at) {
  const Json* v = tokenizer_internal::OptionalMember(root, key);
  if (v == nullptr) return std::optional<std::string>();
  if (v->is_string()) return std::optional<std::string>(v->get<std::string>());
  if (v->is_object()) {
    DSMOE_ASSIGN_OR_RETURN(std::string content,
                           tokenizer_internal::GetString(*v, "content", at.Field(key)));
    return std::optional<std::string>(std::move(content));
  }
  return at.Field(key).Error("expected a string or an object with \"content\"");
}

}  // namespace

absl::StatusOr<TokenizerConfig> TokenizerConfig::FromJson(std::string_view text,
                                                          std::string_view source_name) {
  DSMOE_ASSIGN_OR_RETURN(const Json root, ParseJson(text, source_name));
  const JsonPath at{source_name, ""};
  if (!root.is_object()) return at.Error("expected a JSON object");
  TokenizerConfig c;
  DSMOE_ASSIGN_OR_RETURN(c.bos_token, ConfigToken(root, "bos_token", at));
  DSMOE_ASSIGN_OR_RETURN(c.eos_token, ConfigToken(root, "eos_token", at));
  for (auto [key, field] : {std::pair{"add_bos_token", &c.add_bos_token},
                            std::pair{"add_eos_token", &c.add_eos_token}}) {
    if (const Json* v = tokenizer_internal::OptionalMember(root, key)) {
      if (!v->is_boolean()) return at.Field(key).Error("expected a boolean");
      *field = v->get<bool>();
    }
  }
  return c;
}

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromFile(const std::string& path) {
  DSMOE_ASSIGN_OR_RETURN(const std::string text, ReadFile(path));
  TokenizerConfig config;
  const std::filesystem::path config_path =
      std::filesystem::path(path).parent_path() / "tokenizer_config.json";
  std::error_code ec;
  if (std::filesystem::exists(config_path, ec)) {
    DSMOE_ASSIGN_OR_RETURN(const std::string config_text, ReadFile(config_path.string()));
    DSMOE_ASSIGN_OR_RETURN(config, TokenizerConfig::FromJson(config_text, config_path.string()));
  }
  return FromJson(text, path, config);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(std::string_view tokenizer_json,
                                                               std::string_view source_name,
                                                               const TokenizerConfig& config) {
  // nlohmann::json and the standard library may throw (bad_alloc, a type error missed by the
  // checks below); nothing may escape this module, so they become errors here.
  try {
    DSMOE_ASSIGN_OR_RETURN(const Json root, ParseJson(tokenizer_json, source_name));
    const JsonPath at{source_name, ""};
    if (!root.is_object()) return at.Error("expected a JSON object");
    static const Json kNull;
    auto member_or_null = [&](std::string_view key) -> const Json& {
      const Json* m = tokenizer_internal::OptionalMember(root, key);
      return m != nullptr ? *m : kNull;
    };
    std::unique_ptr<Tokenizer> t(new Tokenizer());
    DSMOE_ASSIGN_OR_RETURN(const Json* model, tokenizer_internal::Member(root, "model", at));
    DSMOE_ASSIGN_OR_RETURN(t->model_, tokenizer_internal::MakeModel(*model, at.Field("model")));
    DSMOE_ASSIGN_OR_RETURN(
        t->normalizer_,
        tokenizer_internal::MakeNormalizer(member_or_null("normalizer"), at.Field("normalizer")));
    DSMOE_ASSIGN_OR_RETURN(t->pre_tokenizer_,
                           tokenizer_internal::MakePreTokenizer(member_or_null("pre_tokenizer"),
                                                                at.Field("pre_tokenizer")));
    DSMOE_ASSIGN_OR_RETURN(t->post_processor_,
                           tokenizer_internal::MakePostProcessor(member_or_null("post_processor"),
                                                                 at.Field("post_processor")));
    DSMOE_ASSIGN_OR_RETURN(t->decoder_, tokenizer_internal::MakeDecoder(member_or_null("decoder"),
                                                                        at.Field("decoder")));
    DSMOE_ASSIGN_OR_RETURN(auto added, ParseAddedTokens(root, at));
    DSMOE_ASSIGN_OR_RETURN(
        t->added_, AddedVocabulary::Build(std::move(added), *t->model_, t->normalizer_.get()));
    t->vocab_size_ = std::max({t->model_->max_id(), t->added_->max_id(),
                               t->post_processor_ ? t->post_processor_->MaxId() : -1}) +
                     1;
    t->concat_safe_ = t->decoder_ != nullptr && t->decoder_->ConcatenationSafe();
    t->trailing_strip_ = t->decoder_ != nullptr ? t->decoder_->TrailingStripChars() : 0;
    t->groups_bytes_ = t->decoder_ != nullptr && t->decoder_->GroupsByteTokens();

    // tokenizer_config.json.
    const std::string config_name = "tokenizer_config.json";
    auto resolve = [&](const std::optional<std::string>& token,
                       std::string_view key) -> absl::StatusOr<std::optional<int32_t>> {
      if (!token) return std::optional<int32_t>();
      auto id = t->TokenToId(*token);
      if (!id) {
        return absl::InvalidArgumentError(Cat(config_name, ": ", key, " '", *token,
                                              "' is not in the vocabulary of ", source_name));
      }
      return id;
    };
    DSMOE_ASSIGN_OR_RETURN(t->bos_id_, resolve(config.bos_token, "bos_token"));
    DSMOE_ASSIGN_OR_RETURN(t->eos_id_, resolve(config.eos_token, "eos_token"));
    if (config.add_bos_token.has_value() || config.add_eos_token.has_value()) {
      std::vector<int32_t> prefix, suffix;
      if (config.add_bos_token.value_or(false)) {
        if (!t->bos_id_)
          return absl::InvalidArgumentError(
              Cat(config_name, ": add_bos_token is true but bos_token is missing"));
        prefix.push_back(*t->bos_id_);
      }
      if (config.add_eos_token.value_or(false)) {
        if (!t->eos_id_)
          return absl::InvalidArgumentError(
              Cat(config_name, ": add_eos_token is true but eos_token is missing"));
        suffix.push_back(*t->eos_id_);
      }
      t->post_processor_ =
          tokenizer_internal::MakeAffixProcessor(std::move(prefix), std::move(suffix));
    }
    DSMOE_ASSIGN_OR_RETURN(const std::vector<int32_t> empty, t->Encode("", true));
    t->adds_bos_ = t->bos_id_.has_value() && !empty.empty() && empty.front() == *t->bos_id_;
    return t;
  } catch (const std::exception& e) {
    return absl::InternalError(Cat(source_name, ": unexpected error while loading: ", e.what()));
  }
}

absl::Status Tokenizer::EncodeText(std::string_view text, std::vector<int32_t>& ids) const {
  if (text.empty()) return absl::OkStatus();
  thread_local PieceList pieces, scratch;
  pieces.Reset(text);
  if (pre_tokenizer_ != nullptr)
    DSMOE_RETURN_IF_ERROR(pre_tokenizer_->PreTokenize(pieces, scratch));
  for (const auto& [b, e] : pieces.spans) {
    DSMOE_RETURN_IF_ERROR(model_->Tokenize(std::string_view(pieces.text).substr(b, e - b), ids));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<int32_t>> Tokenizer::Encode(std::string_view text,
                                                       bool add_special_tokens) const {
  DSMOE_RETURN_IF_ERROR(tokenizer_internal::ValidateUtf8(text, "text to encode"));
  std::vector<int32_t> ids;
  ids.reserve(text.size() / 3 + 4);
  std::vector<SegmentPiece> raw, norm;
  added_->Split(text, /*normalized_set=*/false, raw);
  std::string normalized;
  for (const SegmentPiece& r : raw) {
    if (r.id >= 0) {
      ids.push_back(r.id);
      continue;
    }
    std::string_view segment = text.substr(r.span.first, r.span.second - r.span.first);
    if (normalizer_ != nullptr) {
      normalized.assign(segment);
      DSMOE_RETURN_IF_ERROR(normalizer_->Normalize(normalized));
      segment = normalized;
    }
    norm.clear();
    added_->Split(segment, /*normalized_set=*/true, norm);
    for (const SegmentPiece& p : norm) {
      if (p.id >= 0) {
        ids.push_back(p.id);
      } else {
        DSMOE_RETURN_IF_ERROR(
            EncodeText(segment.substr(p.span.first, p.span.second - p.span.first), ids));
      }
    }
  }
  if (add_special_tokens && post_processor_ != nullptr)
    DSMOE_RETURN_IF_ERROR(post_processor_->Process(ids));
  return ids;
}

absl::StatusOr<std::string> Tokenizer::Decode(std::span<const int32_t> ids,
                                              bool skip_special_tokens) const {
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (const int32_t id : ids) {
    if (id < 0) return absl::InvalidArgumentError(Cat("Decode: negative token id ", id));
    const std::string* tok = added_->IdToToken(id);
    if (tok == nullptr) tok = model_->IdToToken(id);
    if (tok == nullptr) continue;  // the reference skips ids it does not know
    if (skip_special_tokens && added_->IsSpecial(id)) continue;
    tokens.push_back(*tok);
  }
  if (decoder_ == nullptr) return absl::StrJoin(tokens, " ");
  DSMOE_RETURN_IF_ERROR(decoder_->DecodeChain(tokens));
  return absl::StrJoin(tokens, "");
}

std::optional<int32_t> Tokenizer::TokenToId(std::string_view token) const {
  if (auto id = added_->TokenToId(token)) return id;
  return model_->TokenToId(token);
}

std::optional<std::string> Tokenizer::IdToToken(int32_t id) const {
  if (const std::string* t = added_->IdToToken(id)) return *t;
  if (const std::string* t = model_->IdToToken(id)) return *t;
  return std::nullopt;
}

bool Tokenizer::IsSpecialToken(int32_t id) const { return added_->IsSpecial(id); }

bool Tokenizer::IsByteFallbackToken(int32_t id) const {
  if (added_->IdToToken(id) != nullptr) return false;
  const std::string* t = model_->IdToToken(id);
  return t != nullptr && t->size() == 6 && t->compare(0, 3, "<0x") == 0 && (*t)[5] == '>';
}

}  // namespace dsmoe
