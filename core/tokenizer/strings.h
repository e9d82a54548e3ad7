// String helpers for the tokenizer. Debian 12's Abseil is built with its own absl::string_view
// (ABSL_OPTION_USE_STD_STRING_VIEW 0), so absl::StrCat and absl's heterogeneous hash-map lookup
// do not accept std::string_view; these helpers bridge that.
#pragma once

#include <string>
#include <string_view>
#include <type_traits>

#include "absl/strings/string_view.h"

namespace dsmoe::tokenizer_internal {

inline absl::string_view ToAbsl(std::string_view s) {
  return absl::string_view(s.data(), s.size());
}

namespace strings_detail {
inline void Append(std::string& out, std::string_view s) { out.append(s); }
inline void Append(std::string& out, const char* s) { out.append(s); }
inline void Append(std::string& out, const std::string& s) { out.append(s); }
inline void Append(std::string& out, absl::string_view s) { out.append(s.data(), s.size()); }
inline void Append(std::string& out, char c) { out.push_back(c); }
template <typename T, typename = std::enable_if_t<std::is_integral_v<T>>>
inline void Append(std::string& out, T v) {
  out.append(std::to_string(v));
}
}  // namespace strings_detail

// Concatenates strings, string views (std and absl), characters and integers.
template <typename... Args>
std::string Cat(const Args&... args) {
  std::string out;
  (strings_detail::Append(out, args), ...);
  return out;
}

}  // namespace dsmoe::tokenizer_internal
