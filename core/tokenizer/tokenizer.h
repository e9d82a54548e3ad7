// dsmoe's tokenizer: loads a Hugging Face tokenizer.json (byte-level BPE as shipped with
// DeepSeek, Llama 2/3 and GPT-2 style models) and encodes/decodes exactly as Hugging Face's
// `tokenizers` library does (tests/tokenizer/ checks this against the reference on a corpus).
//
//   auto tok = Tokenizer::FromFile("/models/ds/tokenizer.json");   // + tokenizer_config.json
//   auto ids = (*tok)->Encode("Hello", /*add_special_tokens=*/true);
//   auto text = (*tok)->Decode(*ids, /*skip_special_tokens=*/false);
//
// Supported components (anything else is refused at load with an error naming its JSON path):
//   normalizer      Sequence, NFC, NFD, NFKC, NFKD, Lowercase, Prepend, Replace, Strip
//   pre_tokenizer   Sequence, Split (String/Regex, all behaviours, invert), ByteLevel, Digits,
//                   WhitespaceSplit
//   model           BPE (merges as "a b" strings or pairs, ignore_merges, byte_fallback, unk,
//                   fuse_unk, continuing_subword_prefix, end_of_word_suffix; no dropout)
//   post_processor  ByteLevel, TemplateProcessing (single), RobertaProcessing, BertProcessing,
//                   Sequence
//   decoder         ByteLevel, Sequence, Replace, Fuse, Strip, ByteFallback
// `truncation` and `padding` are batch settings of the reference's API and are ignored.
//
// tokenizer_config.json (read by FromFile from the same directory, when present): bos_token /
// eos_token name the BOS/EOS tokens; if add_bos_token or add_eos_token is given, Encode with
// add_special_tokens=true adds exactly [BOS] text [EOS] as configured, replacing the file's
// post-processor — what transformers' Llama-style fast tokenizers (DeepSeek's class) do.
//
// Thread-safety: a Tokenizer is immutable after loading; all const methods may be called from
// any number of threads concurrently.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dsmoe {

namespace tokenizer_internal {
class AddedVocabulary;
class Decoder;
class Model;
class Normalizer;
class PostProcessor;
class PreTokenizer;
}  // namespace tokenizer_internal

// What tokenizer_config.json contributes (all optional).
struct TokenizerConfig {
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
  std::optional<bool> add_bos_token;
  std::optional<bool> add_eos_token;

  // Parses tokenizer_config.json text. Fields are read leniently where transformers is lenient
  // (a token may be a string or an {"content": ...} object); a malformed file is an error.
  static absl::StatusOr<TokenizerConfig> FromJson(std::string_view text,
                                                  std::string_view source_name);
};

class Tokenizer {
 public:
  // Loads `path` (tokenizer.json) and, if it exists, tokenizer_config.json beside it.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromFile(const std::string& path);
  // Loads from tokenizer.json text; `source_name` is used in error messages.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(std::string_view tokenizer_json,
                                                             std::string_view source_name,
                                                             const TokenizerConfig& config = {});

  ~Tokenizer();
  Tokenizer(const Tokenizer&) = delete;
  Tokenizer& operator=(const Tokenizer&) = delete;

  // Encodes UTF-8 `text`. Added/special tokens appearing in the text are always recognised;
  // `add_special_tokens` controls only the post-processor (e.g. BOS). Invalid UTF-8 is refused
  // with InvalidArgument naming the byte offset.
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text, bool add_special_tokens) const;

  // Decodes `ids` as the reference does: ids unknown to the vocabulary are skipped, special
  // tokens are skipped if `skip_special_tokens`, invalid byte sequences become U+FFFD.
  // Negative ids are refused with InvalidArgument.
  absl::StatusOr<std::string> Decode(std::span<const int32_t> ids, bool skip_special_tokens) const;

  // Largest id + 1 over the model vocabulary and the added tokens: the embedding rows a model
  // needs for this tokenizer.
  int32_t vocab_size() const { return vocab_size_; }
  std::optional<int32_t> TokenToId(std::string_view token) const;
  // The token string of `id` (an added token's content or the model's token), if any.
  std::optional<std::string> IdToToken(int32_t id) const;
  bool IsSpecialToken(int32_t id) const;

  std::optional<int32_t> bos_id() const { return bos_id_; }
  std::optional<int32_t> eos_id() const { return eos_id_; }
  // Whether Encode(..., add_special_tokens=true) prepends BOS (from the config, or from the
  // post-processor's template when the config does not say).
  bool adds_bos() const { return adds_bos_; }

  // For StreamingDecoder: whether decoded history can be dropped at a complete character, and
  // how many trailing characters a later token could still strip.
  bool decoder_concatenation_safe() const { return concat_safe_; }
  int decoder_trailing_strip_chars() const { return trailing_strip_; }
  // True if the decoder decodes runs of <0xXX> byte tokens as a group, and whether `id` is one.
  bool decoder_groups_byte_tokens() const { return groups_bytes_; }
  bool IsByteFallbackToken(int32_t id) const;

 private:
  Tokenizer();
  absl::Status EncodeText(std::string_view text, std::vector<int32_t>& ids) const;

  std::unique_ptr<tokenizer_internal::Normalizer> normalizer_;
  std::unique_ptr<tokenizer_internal::PreTokenizer> pre_tokenizer_;
  std::unique_ptr<tokenizer_internal::Model> model_;
  std::unique_ptr<tokenizer_internal::PostProcessor> post_processor_;
  std::unique_ptr<tokenizer_internal::Decoder> decoder_;
  std::unique_ptr<tokenizer_internal::AddedVocabulary> added_;
  int32_t vocab_size_ = 0;
  std::optional<int32_t> bos_id_, eos_id_;
  bool adds_bos_ = false;
  bool concat_safe_ = false;
  int trailing_strip_ = 0;
  bool groups_bytes_ = false;
};

// Incremental detokenization for streaming responses. Push ids as they are generated; each call
// returns the text that became final. A returned piece never contains a partial UTF-8 sequence
// (bytes are held back until the character completes), and the concatenation of all pieces
// including Finish() equals tokenizer.Decode(all ids). Cost per id is O(1) amortised for
// byte-level decoders; for decoders that are not concatenation-safe (e.g. Llama 2's Strip) it
// re-decodes the ids since the start.
// Thread-compatible: one instance per stream; the Tokenizer must outlive it.
class StreamingDecoder {
 public:
  StreamingDecoder(const Tokenizer& tokenizer, bool skip_special_tokens);

  // Adds one id; returns the newly final text (possibly empty).
  absl::StatusOr<std::string> Push(int32_t id);
  // Ends the stream; returns whatever was held back (e.g. an incomplete sequence as U+FFFD).
  // The decoder can be reused for a new stream afterwards.
  absl::StatusOr<std::string> Finish();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_tokens_;
  std::vector<int32_t> window_;  // ids whose decode is not yet fully emitted
  std::string emitted_;          // what has been emitted from decode(window_)
};

}  // namespace dsmoe
