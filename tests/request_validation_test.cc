// The gateway's request check (gateway/request_validation.h) on hand-written requests: each
// refusal's code and the field its message names.
#include "gateway/request_validation.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dsmoe {
namespace {

using ::testing::HasSubstr;

const RequestLimits kLimits{"tiny", /*vocab_size=*/512, /*max_prompt_tokens=*/64,
                            /*max_tokens_limit=*/128};

absl::Status Check(const v1::GenerateRequest& r) {
  internal::v1::AttentionGenerateRequest up;
  return ValidateGenerateRequest(r, kLimits, /*tokenizer=*/nullptr, &up);
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

}  // namespace
}  // namespace dsmoe
