// The gateway's request check (gateway/request_validation.h) on hand-written requests: each
// refusal's code and the field its message names.
#include "gateway/request_validation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>
#include <string>

namespace dsmoe {
namespace {

using ::testing::HasSubstr;

const RequestLimits kLimits{"tiny", /*vocab_size=*/512, /*max_prompt_tokens=*/64,
                            /*max_tokens_limit=*/128};

absl::Status Check(const v1::GenerateRequest& r) {
  internal::v1::AttentionGenerateRequest up;
  return ValidateGenerateRequest(r, kLimits, /*tokenizer=*/nullptr, &up);
}

// A length-delimited field as the wire format writes it (tag, varint length, bytes).
std::string Field(int number, const std::string& bytes) {
  std::string out(1, static_cast<char>(number << 3 | 2));
  size_t n = bytes.size();
  do {
    out.push_back(static_cast<char>((n & 0x7f) | (n > 0x7f ? 0x80 : 0)));
    n >>= 7;
  } while (n > 0);
  return out + bytes;
}

TEST(Utf8, KnownSequencesAndTheOffsetOfTheFirstBadByte) {
  const size_t npos = absl::string_view::npos;
  const std::pair<std::string, size_t> cases[] = {
      {"", npos},
      {"plain ascii", npos},
      {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", npos},  // é € 😀
      {"\xef\xbf\xbf\xf4\x8f\xbf\xbf", npos},               // U+FFFF, U+10FFFF
      {"hello, w\xffrld", 8},                               // never in UTF-8
      {"ab\xc3(", 2},                                       // a lead without its tail
      {"\xe2\x82", 0},                                      // truncated at the end
      {"x\x80", 1},                                         // a lone continuation
      {"\xc0\xaf", 0},                                      // overlong '/'
      {"\xe0\x80\xaf", 0},                                  // overlong, 3 bytes
      {"\xf0\x80\x80\xaf", 0},                              // overlong, 4 bytes
      {"ok\xed\xa0\x80", 2},                                // surrogate U+D800
      {"\xf4\x90\x80\x80", 0},                              // U+110000
      {"\xf5\x80\x80\x80", 0},
      {std::string("nul\0ok", 6), npos},  // NUL is a character
  };
  for (const auto& [bytes, bad] : cases) EXPECT_EQ(FirstInvalidUtf8(bytes), bad) << bytes;
}

// Against an independent judge, protobuf's own check of a proto3 `string`: a random byte string
// is valid exactly when protobuf parses it as GenerateRequest.text, and the bytes before the
// reported offset always are.
TEST(Utf8, AgreesWithProtobufsStringCheckOnRandomBytes) {
  std::mt19937 rng(7);
  // Bytes around the boundaries that matter (leads, continuations, the excluded ranges).
  const unsigned char pool[] = {'a',  0x00, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf,
                                0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xe1, 0xec, 0xed, 0xee,
                                0xef, 0xf0, 0xf1, 0xf3, 0xf4, 0xf5, 0xff};
  int valid = 0;
  for (int trial = 0; trial < 20000; ++trial) {
    std::string s(rng() % 6, '\0');
    for (char& c : s) c = static_cast<char>(pool[rng() % sizeof(pool)]);
    v1::GenerateRequest parsed;
    const bool protobuf_ok = parsed.ParseFromString(Field(1, s));
    const size_t bad = FirstInvalidUtf8(s);
    ASSERT_EQ(bad == absl::string_view::npos, protobuf_ok) << ::testing::PrintToString(s);
    if (bad != absl::string_view::npos) {
      ASSERT_TRUE(parsed.ParseFromString(Field(1, s.substr(0, bad))));
    }
    valid += protobuf_ok;
  }
  EXPECT_GT(valid, 1000);  // both outcomes were exercised
}

TEST(ParseRequest, InvalidUtf8NamesTheFieldAndByte) {
  v1::GenerateRequest base;
  base.mutable_token_ids()->add_ids(1);
  const std::string ids = base.SerializeAsString();
  const std::pair<std::string, std::string> cases[] = {
      {Field(1, "hello, w\xffrld"), "text is not valid UTF-8 (byte 8)"},
      {ids + Field(8, "ok") + Field(8, "ab\xc3("), "stop[1] is not valid UTF-8 (byte 2)"},
      {ids + Field(11, "\xed\xa0\x80"), "model is not valid UTF-8 (byte 0)"},
  };
  for (const auto& [wire, message] : cases) {
    v1::GenerateRequest r;
    const absl::Status s = ParseGenerateRequest(wire, &r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(s.message(), message);
  }
  v1::TokenizeRequest t;
  const absl::Status s = ParseTokenizeRequest(Field(1, "caf\xc3\xa9 \xe2\x82"), &t);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.message(), "text is not valid UTF-8 (byte 6)");
  // Not a protobuf at all: a length running past the end.
  v1::GenerateRequest r;
  EXPECT_THAT(ParseGenerateRequest("\x0a\x05"
                                   "ab",
                                   &r)
                  .message(),
              HasSubstr("malformed protobuf"));
}

TEST(ParseRequest, AValidRequestParsesAsProtobufWouldParseIt) {
  v1::GenerateRequest want;
  want.set_text("h\xc3\xa9llo \xe2\x9c\x93");
  want.add_stop("\xe2\x82\xac");
  want.add_stop("end");
  want.set_model("tiny");
  want.set_max_tokens(7);
  want.set_ignore_eos(true);
  v1::GenerateRequest got;
  ASSERT_TRUE(ParseGenerateRequest(want.SerializeAsString(), &got).ok());
  EXPECT_EQ(got.SerializeAsString(), want.SerializeAsString());
  v1::TokenizeRequest tw, tg;
  tw.set_text("\xf0\x9f\x98\x80");
  tw.set_add_special_tokens(true);
  ASSERT_TRUE(ParseTokenizeRequest(tw.SerializeAsString(), &tg).ok());
  EXPECT_EQ(tg.SerializeAsString(), tw.SerializeAsString());
}

TEST(RequestValidation, AnEmptyTextAndEmptyTokenIdsAreTheSameEmptyPrompt) {
  v1::GenerateRequest text;
  text.set_text("");
  v1::GenerateRequest ids;
  ids.mutable_token_ids();
  for (const v1::GenerateRequest& r : {text, ids}) {
    const absl::Status s = Check(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(s.message(), "the prompt is empty");
  }
  EXPECT_THAT(std::string(Check(v1::GenerateRequest()).message()),
              HasSubstr("a prompt is required"));
}

TEST(RequestValidation, TokenIdsPastTheVocabularyNameTheFieldAndIndex) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(3);
  r.mutable_token_ids()->add_ids(512);
  EXPECT_EQ(Check(r).message(), "token_ids[1] = 512 is outside the vocabulary [0, 512)");
  r.mutable_token_ids()->set_ids(1, 4);
  r.add_stop_token_ids(7);
  r.add_stop_token_ids(600);
  EXPECT_EQ(Check(r).message(), "stop_token_ids[1] = 600 is outside the vocabulary [0, 512)");
  r.mutable_stop_token_ids()->RemoveLast();
  internal::v1::AttentionGenerateRequest up;
  EXPECT_TRUE(ValidateGenerateRequest(r, kLimits, nullptr, &up).ok());
  EXPECT_EQ(up.prompt_token_ids_size(), 2);
  EXPECT_EQ(up.max_tokens(), 16u);  // the default
}

TEST(RequestValidation, TopLogprobsOutsideZeroToTwentyOrWithoutLogprobsNamesTheField) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(3);
  r.set_logprobs(true);
  for (int bad : {-1, 21, 1000}) {
    r.set_top_logprobs(bad);
    const absl::Status s = Check(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(s.message(), absl::StrCat("top_logprobs must be in [0, 20], got ", bad));
  }
  r.set_top_logprobs(5);
  r.set_logprobs(false);
  EXPECT_EQ(Check(r).message(), "top_logprobs needs logprobs to be set");
  r.set_logprobs(true);
  for (int good : {0, 5, 20}) {
    r.set_top_logprobs(good);
    internal::v1::AttentionGenerateRequest up;
    ASSERT_TRUE(ValidateGenerateRequest(r, kLimits, nullptr, &up).ok()) << good;
    EXPECT_TRUE(up.logprobs());
    EXPECT_EQ(up.top_logprobs(), good);
  }
}

TEST(RequestValidation, PromptLogprobsOutsideZeroToTwentyNamesTheField) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(3);
  for (int bad : {-1, 21, 1000}) {
    r.set_prompt_logprobs(bad);
    const absl::Status s = Check(r);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_EQ(s.message(), absl::StrCat("prompt_logprobs must be in [0, 20], got ", bad));
  }
  for (int good : {0, 1, 20}) {
    r.set_prompt_logprobs(good);
    internal::v1::AttentionGenerateRequest up;
    ASSERT_TRUE(ValidateGenerateRequest(r, kLimits, nullptr, &up).ok()) << good;
    EXPECT_TRUE(up.has_prompt_logprobs());
    EXPECT_EQ(up.prompt_logprobs(), good);
  }
  // Unset: not asked upstream either (0 would still ask for them).
  r.clear_prompt_logprobs();
  internal::v1::AttentionGenerateRequest up;
  ASSERT_TRUE(ValidateGenerateRequest(r, kLimits, nullptr, &up).ok());
  EXPECT_FALSE(up.has_prompt_logprobs());
}

TEST(RequestValidation, MaxTokensZeroOnlyWithPromptLogprobs) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(3);
  r.set_max_tokens(0);
  const absl::Status s = Check(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("max_tokens must be in [1, 128], got 0"));
  EXPECT_THAT(s.message(), HasSubstr("prompt_logprobs"));
  r.set_prompt_logprobs(0);
  internal::v1::AttentionGenerateRequest up;
  ASSERT_TRUE(ValidateGenerateRequest(r, kLimits, nullptr, &up).ok());
  EXPECT_EQ(up.max_tokens(), 0u);
  EXPECT_TRUE(up.has_prompt_logprobs());
  r.set_max_tokens(129);  // the limit still holds
  EXPECT_EQ(Check(r).message(), "max_tokens must be in [1, 128], got 129");
}

}  // namespace
}  // namespace dsmoe
