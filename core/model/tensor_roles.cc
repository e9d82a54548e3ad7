#include "core/model/tensor_roles.h"

#include <cassert>

#include "absl/strings/str_cat.h"

namespace dsmoe {

namespace {

using Shape = std::vector<int64_t>;
using R = TensorRole;
using S = TensorScope;
using K = TensorKind;

int64_t QOut(const ModelConfig& c) { return c.num_attention_heads * c.head_dim(); }
int64_t KvOut(const ModelConfig& c) { return c.num_key_value_heads * c.head_dim(); }

bool Always(const ModelConfig&, int64_t) { return true; }
bool Untied(const ModelConfig& c, int64_t) { return !c.tie_word_embeddings; }
bool Biased(const ModelConfig& c, int64_t) { return c.attention_bias; }
bool Dense(const ModelConfig& c, int64_t layer) { return !c.IsMoeLayer(layer); }
bool Moe(const ModelConfig& c, int64_t layer) { return c.IsMoeLayer(layer); }
bool Shared(const ModelConfig& c, int64_t layer) {
  return c.IsMoeLayer(layer) && c.n_shared_experts > 0;
}

Shape Hidden(const ModelConfig& c) { return {c.hidden_size}; }
Shape VocabByHidden(const ModelConfig& c) { return {c.vocab_size, c.hidden_size}; }
// An MLP's [W, H] gate/up and [H, W] down.
template <int64_t (*Width)(const ModelConfig&)>
Shape MlpIn(const ModelConfig& c) {
  return {Width(c), c.hidden_size};
}
template <int64_t (*Width)(const ModelConfig&)>
Shape MlpOut(const ModelConfig& c) {
  return {c.hidden_size, Width(c)};
}
int64_t DenseWidth(const ModelConfig& c) { return c.intermediate_size; }
int64_t ExpertWidth(const ModelConfig& c) { return c.moe_intermediate_size; }
int64_t SharedWidth(const ModelConfig& c) { return c.shared_intermediate_size(); }

constexpr const char* kHiddenWhy = "hidden_size";
constexpr const char* kQWhy = "num_attention_heads·head_dim × hidden_size";
constexpr const char* kKvWhy = "num_key_value_heads·head_dim × hidden_size";
constexpr const char* kOWhy = "hidden_size × num_attention_heads·head_dim";
constexpr const char* kBiasWhy = "attention_bias is true";
constexpr const char* kDenseWhy = "dense layer: intermediate_size";
constexpr const char* kExpertWhy = "routed expert: moe_intermediate_size";
constexpr const char* kSharedWhy = "shared experts: n_shared_experts·moe_intermediate_size";

// One role per entry, laid out as a table.
// clang-format off
const TensorRoleInfo kTable[] = {
  {R::kTokenEmbedding, "model.embed_tokens.weight", S::kModel, K::kEmbedding,
   VocabByHidden, "vocab_size × hidden_size", Always},
  {R::kInputNorm, "model.layers.%d.input_layernorm.weight", S::kLayer, K::kNorm,
   Hidden, kHiddenWhy, Always},
  {R::kAttnQ, "model.layers.%d.self_attn.q_proj.weight", S::kLayer, K::kLinear,
   [](const ModelConfig& c) -> Shape { return {QOut(c), c.hidden_size}; }, kQWhy, Always},
  {R::kAttnQBias, "model.layers.%d.self_attn.q_proj.bias", S::kLayer, K::kBias,
   [](const ModelConfig& c) -> Shape { return {QOut(c)}; }, kBiasWhy, Biased},
  {R::kAttnK, "model.layers.%d.self_attn.k_proj.weight", S::kLayer, K::kLinear,
   [](const ModelConfig& c) -> Shape { return {KvOut(c), c.hidden_size}; }, kKvWhy, Always},
  {R::kAttnKBias, "model.layers.%d.self_attn.k_proj.bias", S::kLayer, K::kBias,
   [](const ModelConfig& c) -> Shape { return {KvOut(c)}; }, kBiasWhy, Biased},
  {R::kAttnV, "model.layers.%d.self_attn.v_proj.weight", S::kLayer, K::kLinear,
   [](const ModelConfig& c) -> Shape { return {KvOut(c), c.hidden_size}; }, kKvWhy, Always},
  {R::kAttnVBias, "model.layers.%d.self_attn.v_proj.bias", S::kLayer, K::kBias,
   [](const ModelConfig& c) -> Shape { return {KvOut(c)}; }, kBiasWhy, Biased},
  {R::kAttnO, "model.layers.%d.self_attn.o_proj.weight", S::kLayer, K::kLinear,
   [](const ModelConfig& c) -> Shape { return {c.hidden_size, QOut(c)}; }, kOWhy, Always},
  {R::kAttnOBias, "model.layers.%d.self_attn.o_proj.bias", S::kLayer, K::kBias,
   Hidden, kBiasWhy, Biased},
  {R::kPostAttentionNorm, "model.layers.%d.post_attention_layernorm.weight", S::kLayer, K::kNorm,
   Hidden, kHiddenWhy, Always},
  {R::kDenseGate, "model.layers.%d.mlp.gate_proj.weight", S::kLayer, K::kLinear,
   MlpIn<DenseWidth>, kDenseWhy, Dense},
  {R::kDenseUp, "model.layers.%d.mlp.up_proj.weight", S::kLayer, K::kLinear,
   MlpIn<DenseWidth>, kDenseWhy, Dense},
  {R::kDenseDown, "model.layers.%d.mlp.down_proj.weight", S::kLayer, K::kLinear,
   MlpOut<DenseWidth>, kDenseWhy, Dense},
  {R::kRouter, "model.layers.%d.mlp.gate.weight", S::kLayer, K::kRouter,
   [](const ModelConfig& c) -> Shape { return {c.n_routed_experts, c.hidden_size}; },
   "router: n_routed_experts × hidden_size", Moe},
  {R::kExpertGate, "model.layers.%d.mlp.experts.%d.gate_proj.weight", S::kRoutedExpert, K::kLinear,
   MlpIn<ExpertWidth>, kExpertWhy, Moe},
  {R::kExpertUp, "model.layers.%d.mlp.experts.%d.up_proj.weight", S::kRoutedExpert, K::kLinear,
   MlpIn<ExpertWidth>, kExpertWhy, Moe},
  {R::kExpertDown, "model.layers.%d.mlp.experts.%d.down_proj.weight", S::kRoutedExpert, K::kLinear,
   MlpOut<ExpertWidth>, kExpertWhy, Moe},
  {R::kSharedGate, "model.layers.%d.mlp.shared_experts.gate_proj.weight", S::kLayer, K::kLinear,
   MlpIn<SharedWidth>, kSharedWhy, Shared},
  {R::kSharedUp, "model.layers.%d.mlp.shared_experts.up_proj.weight", S::kLayer, K::kLinear,
   MlpIn<SharedWidth>, kSharedWhy, Shared},
  {R::kSharedDown, "model.layers.%d.mlp.shared_experts.down_proj.weight", S::kLayer, K::kLinear,
   MlpOut<SharedWidth>, kSharedWhy, Shared},
  {R::kFinalNorm, "model.norm.weight", S::kModel, K::kNorm, Hidden, kHiddenWhy, Always},
  {R::kLmHead, "lm_head.weight", S::kModel, K::kLinear, VocabByHidden,
   "vocab_size × hidden_size; tie_word_embeddings is false", Untied},
};
// clang-format on

}  // namespace

std::span<const TensorRoleInfo> TensorRoleTable() { return kTable; }

const TensorRoleInfo& RoleInfo(TensorRole role) {
  const TensorRoleInfo& info = kTable[static_cast<size_t>(role)];
  assert(info.role == role);  // the table is in enum order
  return info;
}

std::string TensorName(TensorRole role, int64_t layer, int64_t expert) {
  const int64_t args[] = {layer, expert};
  int used = 0;
  std::string name;
  for (const char* p = RoleInfo(role).name_format; *p != '\0'; ++p) {
    if (p[0] == '%' && p[1] == 'd') {
      absl::StrAppend(&name, args[used++]);
      ++p;
    } else {
      name.push_back(*p);
    }
  }
  return name;
}

std::vector<int64_t> TensorShape(TensorRole role, const ModelConfig& config) {
  return RoleInfo(role).shape(config);
}

bool HasTensor(TensorRole role, const ModelConfig& config, int64_t layer) {
  return RoleInfo(role).present(config, layer);
}

std::string Q8ScaleName(const std::string& name) { return name + "_scale"; }

std::vector<CheckpointTensor> CheckpointTensors(const ModelConfig& c) {
  std::vector<CheckpointTensor> out;
  auto add = [&](const TensorRoleInfo& info, int64_t layer, int64_t expert) {
    out.push_back({info.role, layer, expert, TensorName(info.role, layer, expert), info.shape(c)});
  };
  const std::span<const TensorRoleInfo> table = TensorRoleTable();
  size_t i = 0;
  while (i < table.size()) {
    if (table[i].scope == TensorScope::kModel) {
      if (table[i].present(c, -1)) add(table[i], -1, -1);
      ++i;
      continue;
    }
    // A run of per-layer roles, written layer by layer; within it, a run of routed-expert roles
    // is written expert by expert.
    size_t end = i;
    while (end < table.size() && table[end].scope != TensorScope::kModel) ++end;
    for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
      for (size_t j = i; j < end; ++j) {
        if (table[j].scope == TensorScope::kLayer) {
          if (table[j].present(c, layer)) add(table[j], layer, -1);
          continue;
        }
        size_t experts_end = j;
        while (experts_end < end && table[experts_end].scope == TensorScope::kRoutedExpert) {
          ++experts_end;
        }
        if (table[j].present(c, layer)) {
          for (int64_t e = 0; e < c.n_routed_experts; ++e) {
            for (size_t r = j; r < experts_end; ++r) add(table[r], layer, e);
          }
        }
        j = experts_end - 1;
      }
    }
    i = end;
  }
  return out;
}

}  // namespace dsmoe
