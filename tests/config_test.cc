// config.json parsing: Hugging Face's keys and defaults, type checks that name the key.
#include "core/model/config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "core/model/make_model.h"
#include "core/model/model_facts.h"

namespace dsmoe {
namespace {

using ::testing::HasSubstr;

// The published deepseek-moe-16b-base config.json (keys and values as released).
constexpr char k16B[] = R"({
  "architectures": ["DeepseekForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
  "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001,
  "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
  "intermediate_size": 10944, "max_position_embeddings": 4096, "model_type": "deepseek",
  "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_routed_experts": 64, "n_shared_experts": 2,
  "norm_topk_prob": false, "num_attention_heads": 16, "num_experts_per_tok": 6,
  "num_hidden_layers": 28, "num_key_value_heads": 16, "pretraining_tp": 1, "rms_norm_eps": 1e-06,
  "rope_scaling": null, "rope_theta": 10000, "scoring_func": "softmax", "seq_aux": true,
  "tie_word_embeddings": false, "torch_dtype": "bfloat16", "transformers_version": "4.36.0",
  "use_cache": true, "vocab_size": 102400})";

TEST(ModelConfig, ParsesTheReleased16BConfig) {
  auto c = ModelConfig::FromJson(k16B, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->hidden_size, 2048);
  EXPECT_EQ(c->head_dim(), 128);
  EXPECT_EQ(c->n_shared_experts, 2);
  EXPECT_EQ(c->shared_intermediate_size(), 2816);
  EXPECT_FALSE(c->IsMoeLayer(0));
  EXPECT_TRUE(c->IsMoeLayer(1));
  EXPECT_TRUE(c->IsMoeLayer(27));
  EXPECT_EQ(c->NumMoeLayers(), 27);
  EXPECT_EQ(c->eos_token_ids, std::vector<int64_t>{100001});
  // The paper's figures: 16.4B parameters, 2.8B active per token.
  const ParameterCount p = CountParameters(*c);
  EXPECT_NEAR(p.total / 1e9, 16.4, 0.05);
  EXPECT_NEAR(p.active / 1e9, 2.8, 0.1);
}

TEST(ModelConfig, AbsentKeysTakeDeepseekConfigDefaults) {
  auto c = ModelConfig::FromJson(
      R"({"model_type": "deepseek", "num_attention_heads": 8, "hidden_size": 64})", "c.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_key_value_heads, 8);  // None → num_attention_heads
  EXPECT_EQ(c->n_routed_experts, 0);     // dense model
  EXPECT_EQ(c->moe_layer_freq, 1);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->bos_token_id, 100000);
  EXPECT_FALSE(c->IsMoeLayer(0));
}

TEST(ModelConfig, NullExpertKeysMeanNone) {
  auto c = ModelConfig::FromJson(
      R"({"n_shared_experts": null, "n_routed_experts": 8, "num_experts_per_tok": 2, "num_key_value_heads": null})",
      "c.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_shared_experts, 0);
  EXPECT_EQ(c->num_key_value_heads, c->num_attention_heads);
}

struct BadConfig {
  const char* json;
  const char* expected;
};

class BadConfigTest : public ::testing::TestWithParam<BadConfig> {};

TEST_P(BadConfigTest, IsRefusedNamingTheKey) {
  auto c = ModelConfig::FromJson(GetParam().json, "/models/x/config.json");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(c.status().message()), HasSubstr("/models/x/config.json"));
  EXPECT_THAT(std::string(c.status().message()), HasSubstr(GetParam().expected));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, BadConfigTest,
    ::testing::Values(
        BadConfig{"[1]", "not a JSON object"}, BadConfig{"{", "not valid JSON"},
        BadConfig{R"({"hidden_size": "2048"})",
                  "key 'hidden_size' must be an integer, got \"2048\""},
        BadConfig{R"({"hidden_size": 20.5})", "key 'hidden_size' must be an integer"},
        BadConfig{R"({"norm_topk_prob": 1})", "key 'norm_topk_prob' must be true or false"},
        BadConfig{R"({"rope_theta": "big"})", "key 'rope_theta' must be a number"},
        BadConfig{R"({"eos_token_id": "x"})", "key 'eos_token_id' must be an integer or a list"},
        BadConfig{R"({"model_type": "llama"})", "model_type 'llama' is not supported"},
        BadConfig{R"({"hidden_size": 100, "num_attention_heads": 32})",
                  "not divisible by num_attention_heads"},
        BadConfig{R"({"num_key_value_heads": 5})", "not divisible by num_key_value_heads 5"},
        BadConfig{R"({"n_routed_experts": 4, "num_experts_per_tok": 5})",
                  "num_experts_per_tok must be in [1, n_routed_experts=4]"},
        BadConfig{R"({"n_routed_experts": 4, "num_experts_per_tok": 2, "scoring_func": "sigmoid"})",
                  "scoring_func 'sigmoid'"},
        BadConfig{R"({"rope_scaling": {"type": "dynamic", "factor": 2.0}})",
                  "rope_scaling type 'dynamic' is not supported"},
        BadConfig{R"({"rope_scaling": {"type": "linear"}})", "rope_scaling"},
        BadConfig{R"({"hidden_act": "gelu"})", "hidden_act 'gelu'"},
        BadConfig{R"({"vocab_size": 0})", "key 'vocab_size' must be > 0"},
        BadConfig{R"({"vocab_size": 100})", "eos_token_id 100001 is outside the vocabulary"}));

TEST(ModelConfig, RoundTripsThroughJson) {
  ModelConfig c = *PresetConfig("tiny");
  c.rope_scaling = {RopeScaling::Type::kLinear, 2.0};
  c.eos_token_ids = {1, 2};
  auto back = ModelConfig::FromJson(c.ToJson(), "round-trip");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), c.ToJson());
  EXPECT_EQ(back->rope_scaling.factor, 2.0);
  EXPECT_EQ(back->eos_token_ids, (std::vector<int64_t>{1, 2}));
}

TEST(GenerationConfig, OverridesEosAndChecksRange) {
  const ModelConfig model = *PresetConfig("tiny");
  auto g =
      GenerationConfig::FromJson(R"({"bos_token_id": 0, "eos_token_id": [1, 5]})", "g.json", model);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->eos_token_ids, (std::vector<int64_t>{1, 5}));
  auto bad = GenerationConfig::FromJson(R"({"eos_token_id": 9999})", "g.json", model);
  EXPECT_THAT(std::string(bad.status().message()), HasSubstr("eos_token_id 9999 is outside"));
}

}  // namespace
}  // namespace dsmoe
