// Unit and property tests for dsmoe::Tokenizer on a small byte-level BPE tokenizer built here
// (no external files): UTF-8 handling, round trips, streaming, added tokens, load errors,
// concurrency.
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "cli/tokenize_command.h"
#include "core/tokenizer/regex.h"
#include "core/tokenizer/tokenizer.h"
#include "core/tokenizer/utf8.h"

namespace dsmoe {
namespace {

using tokenizer_internal::AppendUtf8;
using tokenizer_internal::AppendUtf8Lossy;
using tokenizer_internal::IsValidUtf8;

// GPT-2's byte → character mapping, written independently of the library's table.
std::string ByteChar(int b) {
  const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
  int cp = b;
  if (!printable) {
    int n = 0;
    for (int k = 0; k < b; ++k) {
      if (!((k >= 33 && k <= 126) || (k >= 161 && k <= 172) || (k >= 174 && k <= 255))) ++n;
    }
    cp = 256 + n;
  }
  std::string s;
  AppendUtf8(static_cast<char32_t>(cp), s);
  return s;
}

std::string JsonEscape(const std::string& s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\u%04x", c);
      out += buf;
    } else {
      out.push_back(static_cast<char>(c));
    }
  }
  return out;
}

// A byte-level BPE: 256 byte tokens + merges for " t", "th", " th", "he", " the", "中" bytes.
std::string TinyTokenizerJson(
    const std::string& pre_tokenizer =
        R"({"type": "ByteLevel", "add_prefix_space": false, "use_regex": true})",
    const std::string& merges_override = "") {
  std::string vocab = "{";
  int id = 0;
  for (int b = 0; b < 256; ++b) {
    vocab += '"';
    vocab += JsonEscape(ByteChar(b));
    vocab += "\": ";
    vocab += std::to_string(id++);
    vocab += ", ";
  }
  const std::vector<std::pair<std::string, std::string>> merges = {
      {ByteChar(' '), "t"},
      {"t", "h"},
      {ByteChar(' ') + "t", "h"},
      {"h", "e"},
      {ByteChar(' ') + "th", "e"},
      {ByteChar(0xE4), ByteChar(0xB8)},
      {ByteChar(0xE4) + ByteChar(0xB8), ByteChar(0xAD)}};
  std::string merge_list = "[";
  for (size_t i = 0; i < merges.size(); ++i) {
    vocab += "\"" + JsonEscape(merges[i].first + merges[i].second) + "\": " + std::to_string(id++) +
             ", ";
    if (i > 0) merge_list += ", ";
    merge_list += '"';
    merge_list += JsonEscape(merges[i].first + " " + merges[i].second);
    merge_list += '"';
  }
  merge_list += "]";
  vocab += "\"<|s|>\": " + std::to_string(id) + "}";
  return R"({"version": "1.0", "added_tokens": [{"id": )" + std::to_string(id) +
         R"(, "content": "<|s|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
    "normalizer": null, "pre_tokenizer": )" +
         pre_tokenizer +
         R"(, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|s|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
      "pair": [], "special_tokens": {"<|s|>": {"id": "<|s|>", "ids": [)" +
         std::to_string(id) + R"(], "tokens": ["<|s|>"]}}},
    "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "dropout": null, "unk_token": null, "fuse_unk": false, "byte_fallback": false, "vocab": )" +
         vocab + R"(, "merges": )" + (merges_override.empty() ? merge_list : merges_override) +
         "}}";
}

std::unique_ptr<Tokenizer> Tiny() {
  auto t = Tokenizer::FromJson(TinyTokenizerJson(), "tiny.json");
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(t).value();
}

std::string RandomUtf8(std::mt19937& rng, int max_len) {
  std::uniform_int_distribution<int> len(0, max_len), kind(0, 9);
  std::string s;
  for (int n = len(rng); n > 0; --n) {
    char32_t cp;
    switch (kind(rng)) {
      case 0:
      case 1:
      case 2:
        cp = std::uniform_int_distribution<int>(0x20, 0x7E)(rng);
        break;
      case 3:
        cp = std::uniform_int_distribution<int>(0, 0x1F)(rng);
        break;
      case 4:
        cp = std::uniform_int_distribution<int>(0x80, 0x7FF)(rng);
        break;
      case 5:
      case 6:
        cp = std::uniform_int_distribution<int>(0x800, 0xFFFF)(rng);
        break;
      case 7:
        cp = U' ';
        break;
      default:
        cp = std::uniform_int_distribution<int>(0x10000, 0x10FFFF)(rng);
        break;
    }
    if (cp >= 0xD800 && cp <= 0xDFFF) cp = 0xFFFD;
    AppendUtf8(cp, s);
  }
  return s;
}

TEST(Utf8, LossyConversionFollowsMaximalSubparts) {
  auto lossy = [](std::string_view b) {
    std::string out;
    AppendUtf8Lossy(b, out);
    return out;
  };
  const std::string r = "\xEF\xBF\xBD";
  EXPECT_EQ(lossy("a\xE4\xB8"), "a" + r);            // truncated: one replacement
  EXPECT_EQ(lossy("\xF0\x80"), r + r);               // F0 needs 90..BF next
  EXPECT_EQ(lossy("\xED\xA0\x80"), r + r + r);       // surrogates are three subparts
  EXPECT_EQ(lossy("\xE4\xB8\xAD"), "\xE4\xB8\xAD");  // complete
  EXPECT_EQ(lossy("\xC0\xAF"), r + r);               // overlong
  std::string held;
  EXPECT_EQ(AppendUtf8Lossy("x\xE4\xB8", held, /*hold_incomplete_tail=*/true), 2u);
  EXPECT_EQ(held, "x");
}

TEST(Tokenizer, EncodeRefusesInvalidUtf8WithOffset) {
  auto tok = Tiny();
  auto ids = tok->Encode("ok \xC3\x28", true);
  ASSERT_FALSE(ids.ok());
  EXPECT_EQ(ids.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(ids.status().message()).find("not valid UTF-8"), std::string::npos)
      << ids.status();
  EXPECT_NE(std::string(ids.status().message()).find("offset 3"), std::string::npos)
      << ids.status();
  EXPECT_FALSE(tok->Encode("\xED\xA0\x80", false).ok());      // surrogate
  EXPECT_FALSE(tok->Encode("\xF4\x90\x80\x80", false).ok());  // > U+10FFFF
  EXPECT_FALSE(tok->Encode("abc\xE4\xB8", false).ok());       // truncated at end
}

TEST(Tokenizer, MergesAndSpecialTokens) {
  auto tok = Tiny();
  const int32_t s = *tok->TokenToId("<|s|>");
  EXPECT_EQ(tok->vocab_size(), s + 1);
  auto ids = tok->Encode(" the<|s|>中", /*add_special_tokens=*/true);
  ASSERT_TRUE(ids.ok()) << ids.status();
  const std::vector<int32_t> want = {
      s, *tok->TokenToId(ByteChar(' ') + "the"), s,
      *tok->TokenToId(ByteChar(0xE4) + ByteChar(0xB8) + ByteChar(0xAD))};
  EXPECT_EQ(*ids, want);
  EXPECT_EQ(*tok->Decode(*ids, false), "<|s|> the<|s|>中");
  EXPECT_EQ(*tok->Decode(*ids, true), " the中");
  EXPECT_TRUE(tok->IsSpecialToken(s));
  EXPECT_FALSE(tok->Decode(std::vector<int32_t>{-1}, false).ok());
  EXPECT_EQ(*tok->Decode(std::vector<int32_t>{1 << 20}, false), "");  // unknown ids are skipped
}

// Property: random valid UTF-8 round-trips through encode/decode unchanged.
TEST(Tokenizer, RandomUtf8RoundTrips) {
  auto tok = Tiny();
  std::mt19937 rng(1234);
  for (int i = 0; i < 3000; ++i) {
    const std::string text = RandomUtf8(rng, 40);
    ASSERT_TRUE(IsValidUtf8(text));
    auto ids = tok->Encode(text, false);
    ASSERT_TRUE(ids.ok()) << ids.status();
    auto back = tok->Decode(*ids, false);
    ASSERT_TRUE(back.ok());
    ASSERT_EQ(*back, text) << "case " << i;
  }
}

// Property: streamed pieces are valid UTF-8 and concatenate to the full decode.
TEST(StreamingDecoder, PiecesAreValidAndConcatenateToDecode) {
  auto tok = Tiny();
  std::mt19937 rng(99);
  for (int i = 0; i < 1000; ++i) {
    const std::string text = RandomUtf8(rng, 30);
    auto ids = tok->Encode(text, true);
    ASSERT_TRUE(ids.ok());
    StreamingDecoder stream(*tok, /*skip_special_tokens=*/true);
    std::string all;
    for (int32_t id : *ids) {
      auto piece = stream.Push(id);
      ASSERT_TRUE(piece.ok()) << piece.status();
      ASSERT_TRUE(IsValidUtf8(*piece));
      all += *piece;
    }
    auto rest = stream.Finish();
    ASSERT_TRUE(rest.ok());
    all += *rest;
    ASSERT_EQ(all, text);
  }
}

TEST(StreamingDecoder, HoldsIncompleteCharacterAndFlushesOnFinish) {
  auto tok = Tiny();
  const int32_t e4 = *tok->TokenToId(ByteChar(0xE4)), b8 = *tok->TokenToId(ByteChar(0xB8)),
                ad = *tok->TokenToId(ByteChar(0xAD)), a = *tok->TokenToId("a");
  StreamingDecoder stream(*tok, false);
  EXPECT_EQ(*stream.Push(a), "a");
  EXPECT_EQ(*stream.Push(e4), "");
  EXPECT_EQ(*stream.Push(b8), "");
  EXPECT_EQ(*stream.Push(ad), "中");
  EXPECT_EQ(*stream.Push(e4), "");
  // The stream ends inside a character: Finish returns what Decode gives for it.
  EXPECT_EQ(*stream.Finish(), "\xEF\xBF\xBD");
  // An invalid sequence is final once the next byte shows it cannot complete.
  EXPECT_EQ(*stream.Push(e4), "");
  EXPECT_EQ(*stream.Push(a),
            "\xEF\xBF\xBD"
            "a");
}

TEST(Tokenizer, ConcurrentEncodeIsConsistent) {
  auto tok = Tiny();
  std::mt19937 rng(7);
  std::vector<std::string> texts;
  for (int i = 0; i < 300; ++i) texts.push_back(RandomUtf8(rng, 60));
  std::vector<std::vector<int32_t>> want;
  for (const auto& t : texts) want.push_back(*tok->Encode(t, true));
  std::vector<std::thread> threads;
  std::atomic<int> bad{0};
  for (int th = 0; th < 4; ++th) {
    threads.emplace_back([&, th] {
      for (int rep = 0; rep < 5; ++rep) {
        for (size_t i = th; i < texts.size() + th; ++i) {
          const size_t k = i % texts.size();
          if (*tok->Encode(texts[k], true) != want[k]) ++bad;
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(bad.load(), 0);
}

// Long words take the priority-queue merge path; both paths must agree with merging piecewise.
TEST(Tokenizer, LongWordsMergeLikeShortOnes) {
  auto tok = Tiny();
  std::string word;
  for (int i = 0; i < 40; ++i) word += "the";  // one pre-token of 120 characters
  auto ids = tok->Encode(word, false);
  ASSERT_TRUE(ids.ok());
  std::vector<int32_t> want;
  for (int i = 0; i < 40; ++i) {
    auto part = tok->Encode("the", false);
    want.insert(want.end(), part->begin(), part->end());
  }
  EXPECT_EQ(*ids, want);
}

void ExpectLoadError(const std::string& json, absl::StatusCode code,
                     const std::vector<std::string>& fragments) {
  auto t = Tokenizer::FromJson(json, "bad.json");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), code) << t.status();
  for (const auto& f : fragments) {
    EXPECT_NE(std::string(t.status().message()).find(f), std::string::npos)
        << "missing '" << f << "' in " << t.status();
  }
}

TEST(TokenizerLoad, ErrorsNameTheComponent) {
  ExpectLoadError("{not json", absl::StatusCode::kInvalidArgument, {"bad.json", "not valid JSON"});
  ExpectLoadError("[]", absl::StatusCode::kInvalidArgument, {"bad.json", "expected a JSON object"});
  ExpectLoadError(R"({"added_tokens": []})", absl::StatusCode::kInvalidArgument,
                  {"model", "missing"});
  ExpectLoadError(TinyTokenizerJson(R"({"type": "Metaspace", "replacement": "_"})"),
                  absl::StatusCode::kUnimplemented,
                  {"bad.json", "pre_tokenizer", "unsupported pre-tokenizer type 'Metaspace'"});
  ExpectLoadError(
      TinyTokenizerJson(
          R"({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated"}]})"),
      absl::StatusCode::kInvalidArgument,
      {"pre_tokenizer.pretokenizers[0].pattern.Regex", "PCRE2"});
  ExpectLoadError(
      TinyTokenizerJson(R"({"type": "Split", "pattern": {"Regex": "a"}, "behavior": "Sideways"})"),
      absl::StatusCode::kInvalidArgument, {"pre_tokenizer.behavior", "Sideways"});
  ExpectLoadError(TinyTokenizerJson(R"({"type": "ByteLevel"})", R"(["x y"])"),
                  absl::StatusCode::kInvalidArgument, {"model.merges[0]", "not in model.vocab"});
  ExpectLoadError(TinyTokenizerJson(R"({"type": "ByteLevel"})", R"(["abc"])"),
                  absl::StatusCode::kInvalidArgument, {"model.merges[0]"});
  std::string wordpiece = TinyTokenizerJson();
  wordpiece.replace(wordpiece.find("\"type\": \"BPE\""), 13, "\"type\": \"WordPiece\"");
  ExpectLoadError(wordpiece, absl::StatusCode::kUnimplemented,
                  {"model", "unsupported model type 'WordPiece'"});
  std::string decoder = TinyTokenizerJson();
  decoder.replace(decoder.find(R"({"type": "ByteLevel"})"), 21, R"({"type": "CTC"})");
  ExpectLoadError(decoder, absl::StatusCode::kUnimplemented, {"decoder", "'CTC'"});
  std::string normalizer = TinyTokenizerJson();
  normalizer.replace(normalizer.find(R"("normalizer": null)"), 18,
                     R"("normalizer": {"type": "BertNormalizer"})");
  ExpectLoadError(normalizer, absl::StatusCode::kUnimplemented, {"normalizer", "'BertNormalizer'"});
  ExpectLoadError(
      TinyTokenizerJson(
          R"({"type": "Split", "pattern": {"Regex": "[a&&b]"}, "behavior": "Isolated"})"),
      absl::StatusCode::kInvalidArgument, {"&&"});
}

TEST(TokenizerLoad, MissingFileIsNotFound) {
  auto t = Tokenizer::FromFile("/nonexistent/tokenizer.json");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kNotFound);
}

TEST(TokenizerConfig, ParsesBosEosAndFlags) {
  auto c = TokenizerConfig::FromJson(
      R"({"add_bos_token": true, "bos_token": {"__type": "AddedToken", "content": "<|s|>"}, "eos_token": "<|s|>"})",
      "tokenizer_config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->bos_token, "<|s|>");
  EXPECT_EQ(c->eos_token, "<|s|>");
  EXPECT_EQ(c->add_bos_token, true);
  EXPECT_FALSE(c->add_eos_token.has_value());
  auto tok = Tokenizer::FromJson(TinyTokenizerJson(), "tiny.json", *c);
  ASSERT_TRUE(tok.ok());
  EXPECT_TRUE((*tok)->adds_bos());
  auto bad = TokenizerConfig::FromJson(R"({"add_bos_token": "yes"})", "tokenizer_config.json");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(std::string(bad.status().message()).find("add_bos_token"), std::string::npos);
  TokenizerConfig unknown;
  unknown.bos_token = "<nope>";
  unknown.add_bos_token = true;
  EXPECT_FALSE(Tokenizer::FromJson(TinyTokenizerJson(), "tiny.json", unknown).ok());
}

TEST(Regex, TranslatesOnigurumaDifferences) {
  using tokenizer_internal::Matcher;
  using tokenizer_internal::Span;
  auto spans = [](const char* pattern, const std::string& text) {
    auto m = Matcher::Regex(pattern);
    EXPECT_TRUE(m.ok()) << m.status();
    std::vector<Span> out;
    EXPECT_TRUE((*m)->FindAll(text, out).ok());
    return out;
  };
  EXPECT_EQ(spans("\\s+",
                  "a\xC2\x85"
                  "b")
                .size(),
            1u);                                                 // U+0085 is \s in Oniguruma
  EXPECT_EQ(spans("\\h+", "xyz 0fA9").size(), 1u);               // \h is a hex digit
  EXPECT_EQ(spans("\\p{Hiragana}", "\xE3\x83\xBC").size(), 0u);  // U+30FC is Script=Common
  EXPECT_EQ(spans("\\p{L}", "\xF0\xB1\x8D\x90").size(), 1u);     // U+31350 (Unicode 15) is a letter
  EXPECT_EQ(spans("[^\\s\\p{L}]+",
                  "\xF0\xB1\x8D\x90"
                  "!")
                .size(),
            1u);  // ... also inside classes
}

TEST(Cli, TokenizeJsonlAndDetokenize) {
  const auto dir =
      std::filesystem::temp_directory_path() / ("dsmoe_tok_cli_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << TinyTokenizerJson();
  std::ofstream(dir / "lines.txt", std::ios::binary) << " the\nab\n\nc";
  cli::TokenizeOptions opts;
  opts.tokenizer_path = (dir / "tokenizer.json").string();
  opts.file = (dir / "lines.txt").string();
  opts.jsonl = true;
  opts.add_special_tokens = false;
  std::ostringstream out, err;
  ASSERT_EQ(cli::RunTokenize(opts, out, err), 0) << err.str();
  auto tok = Tiny();
  std::ostringstream want;
  for (const char* line : {" the", "ab", "", "c"}) {
    want << "[";
    auto ids = *tok->Encode(line, false);
    for (size_t i = 0; i < ids.size(); ++i) want << (i ? "," : "") << ids[i];
    want << "]\n";
  }
  EXPECT_EQ(out.str(), want.str());

  cli::TokenizeOptions both = opts;
  both.text = "x";
  std::ostringstream out2, err2;
  EXPECT_EQ(cli::RunTokenize(both, out2, err2), 2);
  EXPECT_NE(err2.str().find("exactly one of --text or --file"), std::string::npos);

  cli::TokenizeOptions bad_utf8 = opts;
  bad_utf8.file.reset();
  bad_utf8.text = "\xFF";
  std::ostringstream out3, err3;
  EXPECT_EQ(cli::RunTokenize(bad_utf8, out3, err3), 1);
  EXPECT_NE(err3.str().find("not valid UTF-8"), std::string::npos);

  cli::DetokenizeOptions d;
  d.tokenizer_path = opts.tokenizer_path;
  auto ids = *tok->Encode("<|s|> the", false);
  for (size_t i = 0; i < ids.size(); ++i) d.ids += (i ? ", " : "") + std::to_string(ids[i]);
  d.skip_special_tokens = true;
  std::ostringstream out4, err4;
  ASSERT_EQ(cli::RunDetokenize(d, out4, err4), 0) << err4.str();
  EXPECT_EQ(out4.str(), " the\n");
  d.ids = "1,x";
  std::ostringstream out5, err5;
  EXPECT_EQ(cli::RunDetokenize(d, out5, err5), 2);
  EXPECT_NE(err5.str().find("'x'"), std::string::npos);
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace dsmoe
