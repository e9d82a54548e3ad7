// Added tokens (tokenizer.json "added_tokens"): strings that are cut out of the input before
// normalization/pre-tokenization and map to one id each. Follows Hugging Face's AddedVocabulary
// (src/tokenizer/added_vocabulary.rs): two leftmost-longest matchers, one over the raw text for
// tokens with normalized=false and one over normalized text for the others; lstrip/rstrip
// swallow adjacent White_Space; single_word requires non-word characters around the match; ids
// are re-derived the way the reference does on load (model vocab first, then sequential).
// Immutable after Build(); thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "core/tokenizer/components.h"

namespace dsmoe::tokenizer_internal {

struct AddedTokenSpec {
  std::string content;
  bool special = false;
  bool normalized = true;
  bool lstrip = false;
  bool rstrip = false;
  bool single_word = false;
};

// A span of a segment and the added-token id it matched, or -1 for ordinary text.
struct SegmentPiece {
  Span span;
  int32_t id;
};

class AddedVocabulary {
 public:
  // `tokens` in file order. `normalizer` (may be null) normalizes the normalized tokens' content.
  static absl::StatusOr<std::unique_ptr<AddedVocabulary>> Build(std::vector<AddedTokenSpec> tokens,
                                                                const Model& model,
                                                                const Normalizer* normalizer);

  // Splits `text` by the raw (`normalized_set` false) or normalized token matcher. Appends
  // the pieces in order; empty text pieces are omitted.
  void Split(std::string_view text, bool normalized_set, std::vector<SegmentPiece>& out) const;

  bool has_raw_tokens() const { return !raw_.patterns.empty(); }
  bool has_normalized_tokens() const { return !normalized_.patterns.empty(); }

  std::optional<int32_t> TokenToId(std::string_view content) const;
  const std::string* IdToToken(int32_t id) const;
  bool IsSpecial(int32_t id) const;
  int32_t max_id() const { return max_id_; }
  size_t size() const { return by_id_.size(); }

 private:
  // Byte trie with leftmost-longest matching (what aho-corasick's LeftmostLongest gives).
  struct Trie {
    std::vector<std::string> patterns;
    std::vector<int32_t> pattern_ids;
    std::vector<int32_t> terminal;                 // node → pattern index or -1
    absl::flat_hash_map<uint64_t, int32_t> edges;  // (node << 8 | byte) → node
    bool first_byte[256] = {};
    void Add(const std::string& pattern, int32_t id);
    // Longest pattern starting at text[i]: its index, or -1.
    int32_t LongestAt(std::string_view text, size_t i, size_t& len) const;
  };
  void FindMatches(std::string_view text, const Trie& trie, std::vector<SegmentPiece>& out) const;

  struct Entry {
    AddedTokenSpec spec;
    int32_t id;
  };
  absl::flat_hash_map<std::string, int32_t> by_content_;
  absl::flat_hash_map<int32_t, AddedTokenSpec> by_id_;
  int32_t max_id_ = -1;
  Trie raw_, normalized_;
};

}  // namespace dsmoe::tokenizer_internal
