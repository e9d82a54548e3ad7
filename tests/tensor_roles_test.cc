// The tensor table against names and shapes written out by hand from Hugging Face's
// modeling_deepseek.py (DeepseekForCausalLM's state dict), for a config small enough to list.
#include "core/model/tensor_roles.h"

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

#include "core/model/model_facts.h"

namespace dsmoe {
namespace {

using Shape = std::vector<int64_t>;

// 2 layers (layer 0 dense), hidden 8, 2 heads of 4, 1 KV head, 2 routed experts of width 4,
// 1 shared expert, dense width 12, vocab 16, attention biases, untied head.
ModelConfig SmallConfig() {
  ModelConfig c;
  c.vocab_size = 16;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.moe_intermediate_size = 4;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 2;
  c.num_key_value_heads = 1;
  c.n_shared_experts = 1;
  c.n_routed_experts = 2;
  c.num_experts_per_tok = 1;
  c.first_k_dense_replace = 1;
  c.attention_bias = true;
  c.tie_word_embeddings = false;
  return c;
}

std::vector<std::pair<std::string, Shape>> Attention(int layer) {
  const std::string p = "model.layers." + std::to_string(layer) + ".";
  return {{p + "input_layernorm.weight", {8}}, {p + "self_attn.q_proj.weight", {8, 8}},
          {p + "self_attn.q_proj.bias", {8}},  {p + "self_attn.k_proj.weight", {4, 8}},
          {p + "self_attn.k_proj.bias", {4}},  {p + "self_attn.v_proj.weight", {4, 8}},
          {p + "self_attn.v_proj.bias", {4}},  {p + "self_attn.o_proj.weight", {8, 8}},
          {p + "self_attn.o_proj.bias", {8}},  {p + "post_attention_layernorm.weight", {8}}};
}

TEST(TensorRoles, ListEveryTensorOfACheckpointInOrder) {
  std::vector<std::pair<std::string, Shape>> want = {{"model.embed_tokens.weight", {16, 8}}};
  for (auto& t : Attention(0)) want.push_back(t);
  want.insert(want.end(), {{"model.layers.0.mlp.gate_proj.weight", {12, 8}},
                           {"model.layers.0.mlp.up_proj.weight", {12, 8}},
                           {"model.layers.0.mlp.down_proj.weight", {8, 12}}});
  for (auto& t : Attention(1)) want.push_back(t);
  want.insert(want.end(), {{"model.layers.1.mlp.gate.weight", {2, 8}},
                           {"model.layers.1.mlp.experts.0.gate_proj.weight", {4, 8}},
                           {"model.layers.1.mlp.experts.0.up_proj.weight", {4, 8}},
                           {"model.layers.1.mlp.experts.0.down_proj.weight", {8, 4}},
                           {"model.layers.1.mlp.experts.1.gate_proj.weight", {4, 8}},
                           {"model.layers.1.mlp.experts.1.up_proj.weight", {4, 8}},
                           {"model.layers.1.mlp.experts.1.down_proj.weight", {8, 4}},
                           {"model.layers.1.mlp.shared_experts.gate_proj.weight", {4, 8}},
                           {"model.layers.1.mlp.shared_experts.up_proj.weight", {4, 8}},
                           {"model.layers.1.mlp.shared_experts.down_proj.weight", {8, 4}},
                           {"model.norm.weight", {8}},
                           {"lm_head.weight", {16, 8}}});
  const std::vector<CheckpointTensor> got = CheckpointTensors(SmallConfig());
  ASSERT_EQ(got.size(), want.size());
  int64_t total = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].name, want[i].first) << i;
    EXPECT_EQ(got[i].shape, want[i].second) << want[i].first;
    int64_t n = 1;
    for (int64_t d : want[i].second) n *= d;
    total += n;
  }
  // CountParameters walks the table without names; it must count the same tensors.
  EXPECT_EQ(CountParameters(SmallConfig()).total, total);
  // Active: all but the one routed expert of the two a token does not choose.
  EXPECT_EQ(CountParameters(SmallConfig()).active, total - 3 * 8 * 4);
}

// Counted by hand for SmallConfig: per layer attention q 8·8 + k 4·8 + v 4·8 + o 8·8 = 192;
// layer 0 dense 3·12·8 = 288; layer 1 one routed expert of two, 3·4·8 = 96, and the shared
// expert 96; head 16·8 = 128; one embedding row 8. Router 2·8.
TEST(ModelFacts, DecodeWeightsAreWhatOneTokenReads) {
  const DecodeWeights w = CountDecodeWeights(SmallConfig());
  EXPECT_EQ(w.matrices, 192 + 288 + 192 + 96 + 96 + 128 + 8);
  EXPECT_EQ(w.routers, 16);
  ModelConfig tied = SmallConfig();
  tied.tie_word_embeddings = true;  // the head is the embedding matrix: still read whole
  EXPECT_EQ(CountDecodeWeights(tied).matrices, w.matrices);
}

TEST(TensorRoles, TiedEmbeddingsAndNoBiasesDropTheirTensors) {
  ModelConfig c = SmallConfig();
  c.tie_word_embeddings = true;
  c.attention_bias = false;
  c.n_shared_experts = 0;
  for (const CheckpointTensor& t : CheckpointTensors(c)) {
    EXPECT_NE(t.name, "lm_head.weight");
    EXPECT_EQ(t.name.find(".bias"), std::string::npos) << t.name;
    EXPECT_EQ(t.name.find("shared_experts"), std::string::npos) << t.name;
  }
  EXPECT_FALSE(HasTensor(TensorRole::kLmHead, c));
  EXPECT_TRUE(HasTensor(TensorRole::kRouter, c, 1));
  EXPECT_FALSE(HasTensor(TensorRole::kRouter, c, 0));
}

TEST(TensorRoles, TableIsInRoleOrderAndNamesFormat) {
  const auto table = TensorRoleTable();
  for (size_t i = 0; i < table.size(); ++i) EXPECT_EQ(static_cast<size_t>(table[i].role), i);
  EXPECT_EQ(TensorName(TensorRole::kExpertDown, 3, 17),
            "model.layers.3.mlp.experts.17.down_proj.weight");
  EXPECT_EQ(Q8ScaleName(TensorName(TensorRole::kAttnO, 0)),
            "model.layers.0.self_attn.o_proj.weight_scale");
}

}  // namespace
}  // namespace dsmoe
