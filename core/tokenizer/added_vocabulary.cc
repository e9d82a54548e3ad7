#include "core/tokenizer/added_vocabulary.h"

#include "core/tokenizer/strings.h"
#include "core/tokenizer/unicode.h"
#include "core/tokenizer/utf8.h"
#include "core/util/status.h"

namespace dsmoe::tokenizer_internal {

void AddedVocabulary::Trie::Add(const std::string& pattern, int32_t id) {
  if (terminal.empty()) terminal.push_back(-1);  // root
  int32_t node = 0;
  for (unsigned char b : pattern) {
    const uint64_t key = (static_cast<uint64_t>(node) << 8) | b;
    auto it = edges.find(key);
    if (it == edges.end()) {
      terminal.push_back(-1);
      it = edges.emplace(key, static_cast<int32_t>(terminal.size() - 1)).first;
    }
    node = it->second;
  }
  if (terminal[node] < 0) {  // the first pattern wins for duplicates, as in aho-corasick
    terminal[node] = static_cast<int32_t>(patterns.size());
  }
  first_byte[static_cast<unsigned char>(pattern[0])] = true;
  patterns.push_back(pattern);
  pattern_ids.push_back(id);
}

int32_t AddedVocabulary::Trie::LongestAt(std::string_view text, size_t i, size_t& len) const {
  int32_t node = 0, best = -1;
  for (size_t k = i; k < text.size(); ++k) {
    auto it = edges.find((static_cast<uint64_t>(node) << 8) | static_cast<unsigned char>(text[k]));
    if (it == edges.end()) break;
    node = it->second;
    if (terminal[node] >= 0) best = terminal[node], len = k + 1 - i;
  }
  return best;
}

absl::StatusOr<std::unique_ptr<AddedVocabulary>> AddedVocabulary::Build(
    std::vector<AddedTokenSpec> tokens, const Model& model, const Normalizer* normalizer) {
  auto v = std::make_unique<AddedVocabulary>();
  std::vector<Entry> specials, others;  // the reference lists special tokens first
  for (AddedTokenSpec& t : tokens) {
    if (t.content.empty() || v->by_content_.contains(t.content)) continue;
    int32_t id;
    if (auto m = model.TokenToId(t.content)) {
      id = *m;
    } else if (v->by_content_.empty()) {
      id = model.vocab_entries();
    } else {
      // The reference: max(added ids) + 1 once added ids reach the model's vocabulary size,
      // otherwise the vocabulary size.
      id = v->max_id_ >= model.vocab_entries() || model.vocab_entries() == 0
               ? v->max_id_ + 1
               : model.vocab_entries();
    }
    v->by_content_[t.content] = id;
    v->by_id_[id] = t;
    v->max_id_ = std::max(v->max_id_, id);
    (t.special ? specials : others).push_back({t, id});
  }
  for (const auto* list : {&specials, &others}) {
    for (const Entry& e : *list) {
      if (!e.spec.normalized) {
        v->raw_.Add(e.spec.content, e.id);
        continue;
      }
      std::string content = e.spec.content;
      if (normalizer != nullptr) DSMOE_RETURN_IF_ERROR(normalizer->Normalize(content));
      if (!content.empty()) v->normalized_.Add(content, e.id);
    }
  }
  return v;
}

void AddedVocabulary::FindMatches(std::string_view text, const Trie& trie,
                                  std::vector<SegmentPiece>& out) const {
  const auto n = static_cast<uint32_t>(text.size());
  uint32_t start_offset = 0;
  size_t i = 0;
  while (i < text.size()) {
    if (!trie.first_byte[static_cast<unsigned char>(text[i])]) {
      ++i;
      continue;
    }
    size_t len = 0;
    const int32_t pattern = trie.LongestAt(text, i, len);
    if (pattern < 0) {
      ++i;
      continue;
    }
    auto start = static_cast<uint32_t>(i);
    auto stop = static_cast<uint32_t>(i + len);
    i += len;  // non-overlapping: the next search starts after this match
    const int32_t id = trie.pattern_ids[pattern];
    const AddedTokenSpec& tok = by_id_.at(id);
    if (tok.single_word) {
      bool start_space = true, stop_space = true;
      if (start > 0) {
        size_t p = start;
        start_space = !IsWordChar(PrevCodePoint(text, p));
      }
      if (stop < n) {
        size_t p = stop;
        stop_space = !IsWordChar(NextCodePoint(text, p));
      }
      if (!start_space || !stop_space) continue;
    }
    if (tok.lstrip) {
      size_t p = start;
      while (p > 0) {
        size_t q = p;
        if (!IsWhitespace(PrevCodePoint(text, q))) break;
        p = q;
      }
      start = std::max(static_cast<uint32_t>(p), start_offset);
    }
    if (tok.rstrip) {
      size_t p = stop;
      while (p < text.size()) {
        size_t q = p;
        if (!IsWhitespace(NextCodePoint(text, q))) break;
        p = q;
      }
      stop = static_cast<uint32_t>(p);
    }
    if (start_offset < start) out.push_back({{start_offset, start}, -1});
    out.push_back({{start, stop}, id});
    start_offset = stop;
  }
  if (start_offset < n) out.push_back({{start_offset, n}, -1});
}

void AddedVocabulary::Split(std::string_view text, bool normalized_set,
                            std::vector<SegmentPiece>& out) const {
  const Trie& trie = normalized_set ? normalized_ : raw_;
  if (trie.patterns.empty()) {
    if (!text.empty()) out.push_back({{0, static_cast<uint32_t>(text.size())}, -1});
    return;
  }
  FindMatches(text, trie, out);
}

std::optional<int32_t> AddedVocabulary::TokenToId(std::string_view content) const {
  auto it = by_content_.find(ToAbsl(content));
  if (it == by_content_.end()) return std::nullopt;
  return it->second;
}

const std::string* AddedVocabulary::IdToToken(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &it->second.content;
}

bool AddedVocabulary::IsSpecial(int32_t id) const {
  auto it = by_id_.find(id);
  return it != by_id_.end() && it->second.special;
}

}  // namespace dsmoe::tokenizer_internal
