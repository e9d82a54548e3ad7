// The gateway's API keys, held only as SHA-256 digests: the key file (or Kubernetes Secret)
// may itself hold digests, so that reading it grants nothing, and a presented key is hashed
// and compared with every stored digest in constant time.
//
// File format, one entry per line:
//   sha256:<64 hex digits>   the digest of a key (`printf %s KEY | sha256sum`), recommended
//   <key>                    a key itself: 16 or more characters of [A-Za-z0-9._~+/=-]
//                            (RFC 6750's bearer token alphabet), hashed when read
// Blank lines are ignored; `#` starts a comment (it is not a key character).
//
// Const after construction, hence thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/util/status.h"

namespace dsmoe {

class ApiKeyStore {
 public:
  using Digest = std::array<uint8_t, 32>;
  static constexpr size_t kMinKeyLength = 16;

  static Digest Sha256(std::string_view data);
  static std::string Hex(const Digest& digest);

  // Parses a key file's text. Errors name `source` and the line number, never the line's
  // content (it may be a key). Duplicate keys and an empty set are errors.
  static absl::StatusOr<ApiKeyStore> Parse(std::string_view text, const std::string& source);
  static absl::StatusOr<ApiKeyStore> LoadFile(const std::string& path);

  // The index of the stored key equal to `presented`, or -1. Every stored digest is compared
  // (CRYPTO_memcmp, no early exit), so the time taken reveals neither which key matched nor
  // how much of one did.
  int Find(std::string_view presented) const;

  int size() const { return static_cast<int>(digests_.size()); }
  // A name for key `index` that is safe in logs and metric labels: "key-" and the first 8 hex
  // digits of its digest (what `sha256sum` prints first).
  const std::string& Label(int index) const { return labels_[index]; }

 private:
  std::vector<Digest> digests_;
  std::vector<std::string> labels_;
};

}  // namespace dsmoe
