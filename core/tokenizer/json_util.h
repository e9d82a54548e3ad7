// Typed access to tokenizer.json fields with errors as values. Every error names the source
// file and the JSON path of the field (e.g. "tokenizer.json: model.merges[3]: expected ...").
// Internal to core/tokenizer; nlohmann::json never appears in the public headers.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "core/tokenizer/strings.h"

namespace dsmoe::tokenizer_internal {

using Json = nlohmann::json;

// Where a JSON value sits: the file it came from and its path inside it.
struct JsonPath {
  std::string_view source;  // file name for messages; must outlive the JsonPath
  std::string path;         // e.g. "pre_tokenizer.pretokenizers[1]"

  JsonPath Field(std::string_view key) const {
    return {source, path.empty() ? std::string(key) : Cat(path, ".", key)};
  }
  JsonPath Index(size_t i) const { return {source, Cat(path, "[", i, "]")}; }
  absl::Status Error(std::string_view what) const {
    return absl::InvalidArgumentError(
        Cat(source, ": ", path.empty() ? "<root>" : path, ": ", what));
  }
  absl::Status Unsupported(std::string_view component, std::string_view type) const {
    return absl::UnimplementedError(
        Cat(source, ": ", path, ": unsupported ", component, " type '", type, "'"));
  }
};

inline const char* JsonTypeName(const Json& j) { return j.type_name(); }

// The member `key` of object `obj` (error if `obj` is not an object or the key is missing).
inline absl::StatusOr<const Json*> Member(const Json& obj, std::string_view key,
                                          const JsonPath& at) {
  if (!obj.is_object()) return at.Error(Cat("expected an object, got ", JsonTypeName(obj)));
  auto it = obj.find(key);
  if (it == obj.end()) return at.Field(key).Error("missing required field");
  return &*it;
}

// Optional member: nullptr if absent or null.
inline const Json* OptionalMember(const Json& obj, std::string_view key) {
  if (!obj.is_object()) return nullptr;
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

inline absl::StatusOr<std::string> GetString(const Json& obj, std::string_view key,
                                             const JsonPath& at) {
  auto m = Member(obj, key, at);
  if (!m.ok()) return m.status();
  if (!(*m)->is_string())
    return at.Field(key).Error(Cat("expected a string, got ", JsonTypeName(**m)));
  return (*m)->get<std::string>();
}

inline absl::StatusOr<bool> GetBool(const Json& obj, std::string_view key, const JsonPath& at,
                                    std::optional<bool> default_value = std::nullopt) {
  const Json* m = OptionalMember(obj, key);
  if (m == nullptr) {
    if (default_value) return *default_value;
    return at.Field(key).Error("missing required field");
  }
  if (!m->is_boolean())
    return at.Field(key).Error(Cat("expected a boolean, got ", JsonTypeName(*m)));
  return m->get<bool>();
}

inline absl::StatusOr<int64_t> GetInt(const Json& obj, std::string_view key, const JsonPath& at,
                                      std::optional<int64_t> default_value = std::nullopt) {
  const Json* m = OptionalMember(obj, key);
  if (m == nullptr) {
    if (default_value) return *default_value;
    return at.Field(key).Error("missing required field");
  }
  if (!m->is_number_integer()) {
    return at.Field(key).Error(Cat("expected an integer, got ", JsonTypeName(*m)));
  }
  return m->get<int64_t>();
}

// The "type" of a component object.
inline absl::StatusOr<std::string> GetType(const Json& obj, const JsonPath& at) {
  return GetString(obj, "type", at);
}

}  // namespace dsmoe::tokenizer_internal
