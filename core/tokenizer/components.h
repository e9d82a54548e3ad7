// The stages of the Hugging Face tokenization pipeline, as internal interfaces:
//   added tokens → normalizer → pre-tokenizer → model (BPE) → post-processor   (encode)
//   ids → tokens → decoder                                                     (decode)
// Each stage is built from its tokenizer.json object by a factory that rejects unknown or
// malformed components with an error naming the JSON path. All stages are immutable after
// construction and therefore thread-safe.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/tokenizer/json_util.h"
#include "core/tokenizer/regex.h"

namespace dsmoe::tokenizer_internal {

// ---- Normalizers (normalizer.cc) -----------------------------------------------------------

// A {"String": s} or {"Regex": r} pattern object (Split, Replace normalizer and decoder).
absl::StatusOr<std::unique_ptr<Matcher>> MakePattern(const Json& j, const JsonPath& at);

class Normalizer {
 public:
  virtual ~Normalizer() = default;
  // Normalizes `text` (valid UTF-8) in place.
  virtual absl::Status Normalize(std::string& text) const = 0;
};

// `j` may be null (no normalizer): returns nullptr then.
absl::StatusOr<std::unique_ptr<Normalizer>> MakeNormalizer(const Json& j, const JsonPath& at);

// ---- Pre-tokenizers (pre_tokenizer.cc) -----------------------------------------------------

// The pieces of one text segment: spans into `text`. Pre-tokenizers refine the spans and may
// rewrite `text` (ByteLevel maps bytes to its printable alphabet).
struct PieceList {
  std::string text;
  std::vector<Span> spans;
  void Reset(std::string_view t) {
    text.assign(t);
    spans.assign(1, Span{0, static_cast<uint32_t>(t.size())});
  }
};

class PreTokenizer {
 public:
  virtual ~PreTokenizer() = default;
  // Refines `pieces`; `scratch` is a caller-owned buffer to avoid allocations. Empty pieces are
  // dropped.
  virtual absl::Status PreTokenize(PieceList& pieces, PieceList& scratch) const = 0;
};

absl::StatusOr<std::unique_ptr<PreTokenizer>> MakePreTokenizer(const Json& j, const JsonPath& at);

// GPT-2's byte-to-unicode table: byte b is represented by the UTF-8 string kByteLevelChars[b].
struct ByteLevelAlphabet {
  char utf8[256][3];  // 1 or 2 bytes, NUL-terminated
  uint8_t len[256];
  int16_t byte_of[0x144];  // code point → byte, or -1
  static const ByteLevelAlphabet& Get();
};

// ---- Model (bpe_model.cc) ------------------------------------------------------------------

class Model {
 public:
  virtual ~Model() = default;
  // Appends the ids of one pre-tokenized piece.
  virtual absl::Status Tokenize(std::string_view piece, std::vector<int32_t>& ids) const = 0;
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  // nullptr if `id` is not in the vocabulary.
  virtual const std::string* IdToToken(int32_t id) const = 0;
  // Number of entries in the model vocabulary (not max id + 1).
  virtual int32_t vocab_entries() const = 0;
  virtual int32_t max_id() const = 0;
};

absl::StatusOr<std::unique_ptr<Model>> MakeModel(const Json& j, const JsonPath& at);

// ---- Post-processors (post_processor.cc) ---------------------------------------------------

class PostProcessor {
 public:
  virtual ~PostProcessor() = default;
  // Adds special tokens around a single encoded sequence (only called when the caller asked
  // for special tokens).
  virtual absl::Status Process(std::vector<int32_t>& ids) const = 0;
  // The largest id it adds (-1: none): a template may name ids the vocabulary lacks, and
  // Tokenizer::vocab_size must cover every id Encode can return.
  virtual int32_t MaxId() const { return -1; }
};

absl::StatusOr<std::unique_ptr<PostProcessor>> MakePostProcessor(const Json& j, const JsonPath& at);

// A TemplateProcessing equivalent of "[prefix] $A [suffix]" (used for tokenizer_config.json's
// add_bos_token / add_eos_token, which is how transformers' fast tokenizers apply them).
std::unique_ptr<PostProcessor> MakeAffixProcessor(std::vector<int32_t> prefix,
                                                  std::vector<int32_t> suffix);

// ---- Decoders (decoder.cc) -----------------------------------------------------------------

class Decoder {
 public:
  virtual ~Decoder() = default;
  // Hugging Face's decode_chain: transforms the token strings; the result is their
  // concatenation.
  virtual absl::Status DecodeChain(std::vector<std::string>& tokens) const = 0;
  // True if decode(a ++ b) == decode(a) + decode(b) whenever decode(a) ends on a complete
  // character (no trailing U+FFFD); lets the streaming decoder drop decoded history.
  virtual bool ConcatenationSafe() const { return false; }
  // True if the output is a single string joining all tokens (ByteLevel, Fuse).
  virtual bool Joins() const { return false; }
  // True if runs of <0xXX> tokens are decoded as a group (ByteFallback): a later byte token can
  // then change the text of the whole run.
  virtual bool GroupsByteTokens() const { return false; }
  // Trailing characters that a later token could still strip (Strip decoder's `stop`).
  virtual int TrailingStripChars() const { return 0; }
};

absl::StatusOr<std::unique_ptr<Decoder>> MakeDecoder(const Json& j, const JsonPath& at);

}  // namespace dsmoe::tokenizer_internal
