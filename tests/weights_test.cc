// Loading weights: shapes checked against the config with errors naming the tensor, and a
// selection loads only what a role needs.
#include "core/model/weights.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "core/model/make_model.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;

TEST(ModelWeights, LoadsEveryTensorOfTheTinyPreset) {
  TempDir dir;
  const ModelConfig c = testing::WriteTinyModel(dir.path(), DType::kBF16);
  auto w = ModelWeights::Load(dir.path());
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->embed_tokens.dtype, DType::kBF16);
  EXPECT_EQ((*w)->lm_head.rows, c.vocab_size);
  ASSERT_EQ((*w)->layers.size(), 4u);
  EXPECT_FALSE((*w)->layers[0].is_moe);
  EXPECT_TRUE((*w)->layers[0].dense.loaded());
  EXPECT_TRUE((*w)->layers[1].is_moe);
  EXPECT_EQ((*w)->layers[1].routed.size(), 16u);
  EXPECT_EQ((*w)->layers[1].shared.width(), 64);
  EXPECT_EQ((*w)->layers[1].router.rows, 16);
  EXPECT_EQ((*w)->generation_config().eos_token_ids, std::vector<int64_t>{1});
}

TEST(ModelWeights, SelectionLoadsOnlyTheChosenExperts) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  WeightSelection expert_server;
  expert_server.attention_side = false;
  expert_server.all_routed_experts = false;
  expert_server.routed_experts = {{1, 3}, {2, 15}};
  auto w = ModelWeights::Load(dir.path(), expert_server);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_TRUE((*w)->embed_tokens.empty());
  EXPECT_TRUE((*w)->layers[1].router.empty());
  EXPECT_TRUE((*w)->layers[1].routed[3].loaded());
  EXPECT_FALSE((*w)->layers[1].routed[4].loaded());
  EXPECT_TRUE((*w)->layers[2].routed[15].loaded());
  EXPECT_FALSE((*w)->layers[3].routed[3].loaded());
}

TEST(ModelWeights, WrongShapeNamesTensorAndExpectation) {
  TempDir dir;
  ModelConfig c = testing::WriteTinyModel(dir.path());
  c.moe_intermediate_size = 48;  // the checkpoint's experts are 32 wide
  testing::WriteFile(dir.File("config.json"), c.ToJson());
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(
      std::string(s.message()),
      HasSubstr("tensor 'model.layers.1.mlp.shared_experts.gate_proj.weight' has shape [64, 64], "
                "expected [96, 64] (shared experts: n_shared_experts·moe_intermediate_size)"));
}

TEST(ModelWeights, MissingTensorIsNamed) {
  TempDir dir;
  ModelConfig c = testing::WriteTinyModel(dir.path());
  c.attention_bias = true;  // the checkpoint has no biases
  testing::WriteFile(dir.File("config.json"), c.ToJson());
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()),
              HasSubstr("tensor 'model.layers.0.self_attn.q_proj.bias' is missing"));
}

TEST(ModelWeights, BadConfigKeyNamesTheFile) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  testing::WriteFile(dir.File("config.json"), R"({"model_type": "deepseek", "hidden_size": "64"})");
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_THAT(std::string(s.message()), HasSubstr(dir.File("config.json")));
  EXPECT_THAT(std::string(s.message()), HasSubstr("key 'hidden_size' must be an integer"));
}

TEST(ModelWeights, MissingConfigIsNotFound) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  std::filesystem::remove(dir.File("config.json"));
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(s.message()), HasSubstr("config.json"));
}

TEST(ModelWeights, TruncatedShardIsRefused) {
  TempDir dir;
  testing::WriteTinyModel(dir.path());
  const std::string bytes = testing::ReadFile(dir.File("model.safetensors"));
  testing::WriteFile(dir.File("model.safetensors"), bytes.substr(0, bytes.size() - 100));
  const absl::Status s = ModelWeights::Load(dir.path()).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(s.message()), HasSubstr("run past the end of the data"));
}

}  // namespace
}  // namespace dsmoe

namespace dsmoe {
namespace {

TEST(ModelWeights, HugePageCopyHoldsTheSameBytesOnce) {
  testing::TempDir dir;
  ModelConfig c = *PresetConfig("tiny");
  c.tie_word_embeddings = true;
  ASSERT_TRUE(WriteRandomCheckpoint(c, {DType::kBF16, 5, 2}, dir.path()).ok());
  auto mapped =
      ModelWeights::Load(dir.path(), WeightSelection::Everything(), {/*copy_to_huge_pages=*/false});
  auto copied = ModelWeights::Load(dir.path());
  ASSERT_TRUE(mapped.ok() && copied.ok());
  EXPECT_FALSE((*mapped)->in_huge_pages());
  EXPECT_TRUE((*copied)->in_huge_pages());
  EXPECT_EQ((*copied)->lm_head.data, (*copied)->embed_tokens.data);  // tied: one copy
  EXPECT_EQ((*copied)->MatrixBytes(), (*mapped)->MatrixBytes());
  std::vector<const MatrixView*> a, b;
  (*mapped)->ForEachMatrix([&](MatrixView& m) { a.push_back(&m); });
  (*copied)->ForEachMatrix([&](MatrixView& m) { b.push_back(&m); });
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i]->NumBytes(), b[i]->NumBytes());
    ASSERT_NE(a[i]->data, b[i]->data);
    ASSERT_EQ(std::memcmp(a[i]->data, b[i]->data, a[i]->NumBytes()), 0) << "matrix " << i;
  }
}

}  // namespace
}  // namespace dsmoe
