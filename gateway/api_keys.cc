#include "gateway/api_keys.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <map>

#include "absl/strings/ascii.h"
#include "core/io/mapped_file.h"

namespace dsmoe {

namespace {

constexpr std::string_view kHashPrefix = "sha256:";

bool IsTokenChar(char c) {
  return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '.' || c == '_' || c == '~' ||
         c == '+' || c == '/' || c == '=' || c == '-';
}

int HexValue(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

}  // namespace

ApiKeyStore::Digest ApiKeyStore::Sha256(std::string_view data) {
  Digest d;
  unsigned int n = 0;
  EVP_Digest(data.data(), data.size(), d.data(), &n, EVP_sha256(), nullptr);
  return d;
}

std::string ApiKeyStore::Hex(const Digest& digest) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (uint8_t b : digest) {
    out += kDigits[b >> 4];
    out += kDigits[b & 15];
  }
  return out;
}

absl::StatusOr<ApiKeyStore> ApiKeyStore::Parse(std::string_view text, const std::string& source) {
  ApiKeyStore store;
  std::map<Digest, int> first_line;  // digest → line, for duplicates
  int line_number = 0;
  size_t begin = 0;
  while (begin < text.size()) {
    size_t end = text.find('\n', begin);
    if (end == std::string_view::npos) end = text.size();
    std::string_view line = text.substr(begin, end - begin);
    begin = end + 1;
    ++line_number;
    // '#' starts a comment; it is not a key character, so this never cuts a key.
    if (size_t hash = line.find('#'); hash != std::string_view::npos) line = line.substr(0, hash);
    // (Debian's absl has its own string_view type, hence the conversions.)
    const absl::string_view stripped =
        absl::StripAsciiWhitespace(absl::string_view(line.data(), line.size()));
    line = std::string_view(stripped.data(), stripped.size());
    if (line.empty()) continue;
    auto where = [&] { return absl::StrCat(source, " line ", line_number, ": "); };
    Digest digest;
    if (line.substr(0, kHashPrefix.size()) == kHashPrefix) {
      std::string_view hex = line.substr(kHashPrefix.size());
      if (hex.size() != 64) {
        return absl::InvalidArgumentError(absl::StrCat(
            where(), "a sha256: entry needs 64 hex digits, this one has ", hex.size()));
      }
      for (size_t i = 0; i < 32; ++i) {
        const int hi = HexValue(hex[2 * i]), lo = HexValue(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
          return absl::InvalidArgumentError(
              absl::StrCat(where(), "a sha256: entry holds a character that is not a hex digit"));
        }
        digest[i] = static_cast<uint8_t>(hi * 16 + lo);
      }
    } else {
      for (char c : line) {
        if (!IsTokenChar(c)) {
          return absl::InvalidArgumentError(absl::StrCat(
              where(),
              "a key may hold only letters, digits and . _ ~ + / = - (and no spaces); or write "
              "sha256:<hex digest>"));
        }
      }
      if (line.size() < kMinKeyLength) {
        return absl::InvalidArgumentError(absl::StrCat(where(), "a key must have at least ",
                                                       kMinKeyLength, " characters, this one has ",
                                                       line.size()));
      }
      digest = Sha256(line);
    }
    auto [it, inserted] = first_line.emplace(digest, line_number);
    if (!inserted) {
      return absl::InvalidArgumentError(absl::StrCat(where(), "the same key as line ", it->second));
    }
    store.digests_.push_back(digest);
    store.labels_.push_back("key-" + Hex(digest).substr(0, 8));
  }
  if (store.digests_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source,
                                                   ": no API keys (an empty key file "
                                                   "would refuse every request)"));
  }
  return store;
}

absl::StatusOr<ApiKeyStore> ApiKeyStore::LoadFile(const std::string& path) {
  DSMOE_ASSIGN_OR_RETURN(std::string text, ReadTextFile(path, 16 << 20));
  return Parse(text, path);
}

int ApiKeyStore::Find(std::string_view presented) const {
  const Digest d = Sha256(presented);
  int found = -1;
  for (size_t i = 0; i < digests_.size(); ++i) {
    const bool equal = CRYPTO_memcmp(d.data(), digests_[i].data(), d.size()) == 0;
    found = equal ? static_cast<int>(i) : found;
  }
  return found;
}

}  // namespace dsmoe
