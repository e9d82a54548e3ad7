// The BPE model of Hugging Face `tokenizers` (src/models/bpe/model.rs, word.rs): a piece is
// split into characters (with continuing_subword_prefix / end_of_word_suffix, byte_fallback to
// <0xXX> tokens, unk and fuse_unk), then the adjacent pair of lowest merge rank is merged
// repeatedly, leftmost first on ties. ignore_merges returns a piece that is itself a token
// whole. A bounded, sharded cache of piece → ids plays the role of the reference's word cache.
#include <array>
#include <queue>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/hash/hash.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "core/tokenizer/components.h"
#include "core/tokenizer/strings.h"
#include "core/tokenizer/utf8.h"
#include "core/util/status.h"

namespace dsmoe::tokenizer_internal {
namespace {

struct MergeValue {
  int32_t rank;
  int32_t new_id;
};

inline uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// Thread-safe bounded cache; like the reference's, it stops admitting entries when full.
class WordCache {
 public:
  static constexpr size_t kShards = 16;
  static constexpr size_t kCapacityPerShard = 8192;
  static constexpr size_t kMaxKeyBytes = 128;

  bool Lookup(std::string_view key, std::vector<int32_t>& ids) const {
    const Shard& s = shards_[ShardOf(key)];
    absl::MutexLock lock(&s.mu);
    auto it = s.map.find(ToAbsl(key));
    if (it == s.map.end()) return false;
    ids.insert(ids.end(), it->second.begin(), it->second.end());
    return true;
  }
  void Insert(std::string_view key, const int32_t* ids, size_t n) const {
    if (key.size() > kMaxKeyBytes) return;
    Shard& s = shards_[ShardOf(key)];
    absl::MutexLock lock(&s.mu);
    if (s.map.size() >= kCapacityPerShard) return;
    s.map.try_emplace(std::string(key), std::vector<int32_t>(ids, ids + n));
  }

 private:
  struct Shard {
    mutable absl::Mutex mu;
    absl::flat_hash_map<std::string, std::vector<int32_t>> map ABSL_GUARDED_BY(mu);
  };
  static size_t ShardOf(std::string_view key) {
    return absl::Hash<std::string_view>()(key) % kShards;
  }
  mutable std::array<Shard, kShards> shards_;
};

class BpeModel final : public Model {
 public:
  absl::Status Tokenize(std::string_view piece, std::vector<int32_t>& ids) const override {
    if (piece.empty()) return absl::OkStatus();
    if (ignore_merges_) {
      if (auto it = vocab_.find(ToAbsl(piece)); it != vocab_.end()) {
        ids.push_back(it->second);
        return absl::OkStatus();
      }
    }
    if (cache_.Lookup(piece, ids)) return absl::OkStatus();
    const size_t before = ids.size();
    DSMOE_RETURN_IF_ERROR(MergeWord(piece, ids));
    cache_.Insert(piece, ids.data() + before, ids.size() - before);
    return absl::OkStatus();
  }

  std::optional<int32_t> TokenToId(std::string_view token) const override {
    auto it = vocab_.find(ToAbsl(token));
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  const std::string* IdToToken(int32_t id) const override {
    if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_id_[id]) return nullptr;
    return &id_to_token_[id];
  }
  int32_t vocab_entries() const override { return static_cast<int32_t>(vocab_.size()); }
  int32_t max_id() const override { return static_cast<int32_t>(id_to_token_.size()) - 1; }

  static absl::StatusOr<std::unique_ptr<BpeModel>> FromJson(const Json& j, const JsonPath& at);

 private:
  // Initial symbols of `word` (one per character, or bytes / unk), as in BPE::merge_word.
  absl::Status InitialSymbols(std::string_view word, std::vector<int32_t>& symbols) const;
  absl::Status MergeWord(std::string_view word, std::vector<int32_t>& out) const;
  void MergeSmall(std::vector<int32_t>& symbols) const;
  void MergeLarge(std::vector<int32_t>& symbols) const;

  const MergeValue* FindMerge(int32_t a, int32_t b) const {
    auto it = merges_.find(PairKey(a, b));
    return it == merges_.end() ? nullptr : &it->second;
  }

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  absl::flat_hash_map<uint64_t, MergeValue> merges_;
  std::optional<int32_t> unk_id_;
  std::string continuing_subword_prefix_;
  std::string end_of_word_suffix_;
  bool fuse_unk_ = false;
  bool byte_fallback_ = false;
  bool ignore_merges_ = false;
  // Fast path for single characters without prefix/suffix: id of code point < 0x800 or -1.
  std::vector<int32_t> char_id_;
  std::array<int32_t, 256> byte_token_id_{};  // id of "<0xXX>" or -1
  mutable WordCache cache_;
};

absl::Status BpeModel::InitialSymbols(std::string_view word, std::vector<int32_t>& symbols) const {
  const bool plain = continuing_subword_prefix_.empty() && end_of_word_suffix_.empty();
  std::optional<std::pair<int32_t, size_t>> unk;  // pending unk (id, byte length)
  std::string buf;
  size_t i = 0;
  while (i < word.size()) {
    const size_t start = i;
    const char32_t cp = NextCodePoint(word, i);
    const bool is_first = start == 0, is_last = i == word.size();
    int32_t id = -1;
    std::string_view s = word.substr(start, i - start);
    if (plain && cp < char_id_.size()) {
      id = char_id_[cp];
    } else {
      if (!is_first && !continuing_subword_prefix_.empty()) {
        buf.assign(continuing_subword_prefix_).append(s);
        s = buf;
      }
      if (is_last && !end_of_word_suffix_.empty()) {
        if (s.data() != buf.data()) buf.assign(s);
        buf.append(end_of_word_suffix_);
        s = buf;
      }
      if (auto it = vocab_.find(ToAbsl(s)); it != vocab_.end()) id = it->second;
    }
    if (id >= 0) {
      if (unk) {
        symbols.push_back(unk->first);
        unk.reset();
      }
      symbols.push_back(id);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char b : s) all = all && byte_token_id_[b] >= 0;
      if (all) {
        // As in the reference, a pending unk is not flushed before the byte tokens.
        for (unsigned char b : s) symbols.push_back(byte_token_id_[b]);
        continue;
      }
    }
    if (unk_id_) {
      const size_t byte_len = i - start;
      if (unk && fuse_unk_) {
        unk->second += byte_len;
      } else {
        if (unk) symbols.push_back(unk->first);
        unk = std::make_pair(*unk_id_, byte_len);
      }
    }
    // Without an unk token the character is dropped, as in the reference.
  }
  if (unk) symbols.push_back(unk->first);
  return absl::OkStatus();
}

// O(n^2) merging for short words: repeatedly merge the lowest-rank adjacent pair (leftmost on
// ties). Equivalent to the reference's priority queue.
void BpeModel::MergeSmall(std::vector<int32_t>& sym) const {
  constexpr int32_t kNone = INT32_MAX;
  const size_t n0 = sym.size();
  int32_t ranks[64];
  int32_t news[64];
  for (size_t k = 0; k + 1 < n0; ++k) {
    const MergeValue* m = FindMerge(sym[k], sym[k + 1]);
    ranks[k] = m ? m->rank : kNone;
    news[k] = m ? m->new_id : -1;
  }
  size_t n = n0;
  while (n > 1) {
    size_t best = 0;
    int32_t best_rank = kNone;
    for (size_t k = 0; k + 1 < n; ++k) {
      if (ranks[k] < best_rank) best_rank = ranks[k], best = k;
    }
    if (best_rank == kNone) break;
    sym[best] = news[best];
    for (size_t k = best + 1; k + 1 < n; ++k) {
      sym[k] = sym[k + 1];
      ranks[k] = ranks[k + 1];
      news[k] = news[k + 1];
    }
    --n;
    if (best + 1 < n) {
      const MergeValue* m = FindMerge(sym[best], sym[best + 1]);
      ranks[best] = m ? m->rank : kNone;
      news[best] = m ? m->new_id : -1;
    }
    if (best > 0) {
      const MergeValue* m = FindMerge(sym[best - 1], sym[best]);
      ranks[best - 1] = m ? m->rank : kNone;
      news[best - 1] = m ? m->new_id : -1;
    }
  }
  sym.resize(n);
}

// Priority-queue merging for long words (the reference's algorithm): O(n log n).
void BpeModel::MergeLarge(std::vector<int32_t>& sym) const {
  const auto n = static_cast<int32_t>(sym.size());
  std::vector<int32_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (int32_t k = 0; k < n; ++k) prev[k] = k - 1, next[k] = k + 1 < n ? k + 1 : -1;
  struct Entry {
    int32_t rank, pos, new_id;
    bool operator>(const Entry& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> queue;
  for (int32_t k = 0; k + 1 < n; ++k) {
    if (const MergeValue* m = FindMerge(sym[k], sym[k + 1])) queue.push({m->rank, k, m->new_id});
  }
  while (!queue.empty()) {
    const Entry top = queue.top();
    queue.pop();
    if (!alive[top.pos] || next[top.pos] < 0) continue;
    const int32_t right = next[top.pos];
    const MergeValue* m = FindMerge(sym[top.pos], sym[right]);
    if (m == nullptr || m->new_id != top.new_id) continue;  // stale entry
    sym[top.pos] = top.new_id;
    alive[right] = false;
    next[top.pos] = next[right];
    if (next[right] >= 0) prev[next[right]] = top.pos;
    if (prev[top.pos] >= 0) {
      const int32_t p = prev[top.pos];
      if (const MergeValue* pm = FindMerge(sym[p], sym[top.pos]))
        queue.push({pm->rank, p, pm->new_id});
    }
    if (next[top.pos] >= 0) {
      if (const MergeValue* nm = FindMerge(sym[top.pos], sym[next[top.pos]])) {
        queue.push({nm->rank, top.pos, nm->new_id});
      }
    }
  }
  size_t w = 0;
  for (int32_t k = 0; k >= 0 && k < n; k = next[k]) sym[w++] = sym[k];
  sym.resize(w);
}

absl::Status BpeModel::MergeWord(std::string_view word, std::vector<int32_t>& out) const {
  thread_local std::vector<int32_t> symbols;
  symbols.clear();
  DSMOE_RETURN_IF_ERROR(InitialSymbols(word, symbols));
  if (symbols.size() <= 64) {
    MergeSmall(symbols);
  } else {
    MergeLarge(symbols);
  }
  out.insert(out.end(), symbols.begin(), symbols.end());
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<BpeModel>> BpeModel::FromJson(const Json& j, const JsonPath& at) {
  auto m = std::make_unique<BpeModel>();
  if (const Json* dropout = OptionalMember(j, "dropout"); dropout != nullptr) {
    if (!dropout->is_number() || dropout->get<double>() != 0.0) {
      return at.Field("dropout").Error(
          "BPE dropout is not supported (encoding must be deterministic)");
    }
  }
  if (const Json* p = OptionalMember(j, "continuing_subword_prefix")) {
    if (!p->is_string()) return at.Field("continuing_subword_prefix").Error("expected a string");
    m->continuing_subword_prefix_ = p->get<std::string>();
  }
  if (const Json* s = OptionalMember(j, "end_of_word_suffix")) {
    if (!s->is_string()) return at.Field("end_of_word_suffix").Error("expected a string");
    m->end_of_word_suffix_ = s->get<std::string>();
  }
  DSMOE_ASSIGN_OR_RETURN(m->fuse_unk_, GetBool(j, "fuse_unk", at, false));
  DSMOE_ASSIGN_OR_RETURN(m->byte_fallback_, GetBool(j, "byte_fallback", at, false));
  DSMOE_ASSIGN_OR_RETURN(m->ignore_merges_, GetBool(j, "ignore_merges", at, false));

  DSMOE_ASSIGN_OR_RETURN(const Json* vocab, Member(j, "vocab", at));
  if (!vocab->is_object()) return at.Field("vocab").Error("expected an object of token → id");
  m->vocab_.reserve(vocab->size());
  int64_t max_id = -1;
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() >= INT32_MAX) {
      return at.Field("vocab").Error(
          Cat("token '", it.key(), "': expected a non-negative integer id"));
    }
    const auto id = static_cast<int32_t>(it.value().get<int64_t>());
    DSMOE_RETURN_IF_ERROR(ValidateUtf8(it.key(), Cat(at.source, ": model.vocab key")));
    m->vocab_[it.key()] = id;
    max_id = std::max<int64_t>(max_id, id);
  }
  if (max_id > 16 * 1024 * 1024) return at.Field("vocab").Error("ids above 16M are not supported");
  m->id_to_token_.resize(max_id + 1);
  m->has_id_.assign(max_id + 1, false);
  for (const auto& [tok, id] : m->vocab_) {
    m->id_to_token_[id] = tok;
    m->has_id_[id] = true;
  }

  DSMOE_ASSIGN_OR_RETURN(const Json* merges, Member(j, "merges", at));
  if (!merges->is_array()) return at.Field("merges").Error("expected an array");
  m->merges_.reserve(merges->size());
  std::string a, b;
  for (size_t r = 0; r < merges->size(); ++r) {
    const Json& e = (*merges)[r];
    const JsonPath here = at.Field("merges").Index(r);
    if (e.is_string()) {
      // "a b": the reference splits on ' ' and requires exactly two parts.
      const auto& s = e.get_ref<const std::string&>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos) {
        return here.Error(Cat("expected \"<left> <right>\", got '", s, "'"));
      }
      a.assign(s, 0, sp);
      b.assign(s, sp + 1);
    } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
      a = e[0].get<std::string>();
      b = e[1].get<std::string>();
    } else {
      return here.Error("expected a string \"a b\" or a pair [\"a\", \"b\"]");
    }
    auto ia = m->vocab_.find(a), ib = m->vocab_.find(b), inew = m->vocab_.find(a + b);
    if (ia == m->vocab_.end() || ib == m->vocab_.end() || inew == m->vocab_.end()) {
      return here.Error(
          Cat("merge '", a, "' + '", b, "' refers to a token that is not in model.vocab"));
    }
    m->merges_[PairKey(ia->second, ib->second)] = {static_cast<int32_t>(r), inew->second};
  }

  if (const Json* unk = OptionalMember(j, "unk_token")) {
    if (!unk->is_string()) return at.Field("unk_token").Error("expected a string");
    auto it = m->vocab_.find(unk->get<std::string>());
    if (it == m->vocab_.end()) {
      return at.Field("unk_token")
          .Error(Cat("unk token '", unk->get<std::string>(), "' is not in model.vocab"));
    }
    m->unk_id_ = it->second;
  }
  m->char_id_.assign(0x800, -1);
  for (char32_t cp = 0; cp < 0x800; ++cp) {
    std::string s;
    AppendUtf8(cp, s);
    if (auto it = m->vocab_.find(s); it != m->vocab_.end()) m->char_id_[cp] = it->second;
  }
  for (int byte = 0; byte < 256; ++byte) {
    auto it = m->vocab_.find(absl::StrFormat("<0x%02X>", byte));
    m->byte_token_id_[byte] = it == m->vocab_.end() ? -1 : it->second;
  }
  return m;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Model>> MakeModel(const Json& j, const JsonPath& at) {
  if (!j.is_object()) return at.Error("expected the model object");
  // Files written by older versions omit "type" for BPE.
  std::string type = "BPE";
  if (const Json* t = OptionalMember(j, "type")) {
    if (!t->is_string()) return at.Field("type").Error("expected a string");
    type = t->get<std::string>();
  }
  if (type != "BPE") return at.Unsupported("model", type);
  DSMOE_ASSIGN_OR_RETURN(auto bpe, BpeModel::FromJson(j, at));
  return std::unique_ptr<Model>(std::move(bpe));
}

}  // namespace dsmoe::tokenizer_internal
