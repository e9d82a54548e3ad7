// The one table of a DeepSeekMoE checkpoint's tensors: each role's Hugging Face name
// (DeepseekForCausalLM), the shape the config implies and which layers hold it. The loader
// (weights.cc), the checkpoint writer (make_model.cc) and the quantizer (quantize.cc) all read
// it; no other file spells a tensor name. (As llama.cpp's src/llama-arch.cpp does per
// architecture.)
//
//   role                 name                                              shape
//   kTokenEmbedding      model.embed_tokens.weight                         [V, H]
//   per layer N:
//   kInputNorm           model.layers.N.input_layernorm.weight             [H]
//   kAttnQ/K/V/O         model.layers.N.self_attn.{q,k,v,o}_proj.weight    [nh·hd, H] [nkv·hd, H]
//                                                                          [nkv·hd, H] [H, nh·hd]
//   kAttnQ/K/V/OBias     model.layers.N.self_attn.{q,k,v,o}_proj.bias      (attention_bias only)
//   kPostAttentionNorm   model.layers.N.post_attention_layernorm.weight    [H]
//   dense layers:
//   kDenseGate/Up/Down   model.layers.N.mlp.{gate,up,down}_proj.weight     [I, H] [I, H] [H, I]
//   MoE layers:
//   kRouter              model.layers.N.mlp.gate.weight                    [E, H]
//   kExpertGate/Up/Down  model.layers.N.mlp.experts.X.{gate,up,down}_proj.weight  width Im
//   kSharedGate/Up/Down  model.layers.N.mlp.shared_experts.{gate,up,down}_proj.weight  Ks·Im
//   kFinalNorm           model.norm.weight                                 [H]
//   kLmHead              lm_head.weight                    [V, H] (absent when tie_word_embeddings)
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "core/model/config.h"

namespace dsmoe {

// In checkpoint order: the order the table lists them, and the order make_model writes them.
enum class TensorRole {
  kTokenEmbedding,
  kInputNorm,
  kAttnQ,
  kAttnQBias,
  kAttnK,
  kAttnKBias,
  kAttnV,
  kAttnVBias,
  kAttnO,
  kAttnOBias,
  kPostAttentionNorm,
  kDenseGate,
  kDenseUp,
  kDenseDown,
  kRouter,
  kExpertGate,
  kExpertUp,
  kExpertDown,
  kSharedGate,
  kSharedUp,
  kSharedDown,
  kFinalNorm,
  kLmHead,
};

enum class TensorScope {
  kModel,         // one per model
  kLayer,         // one per layer that holds it
  kRoutedExpert,  // one per routed expert of each MoE layer
};

// What a tensor is, for whoever treats kinds differently (random init, quantization).
enum class TensorKind {
  kEmbedding,
  kNorm,
  kLinear,  // a projection's weight: quantized by `dsmoe quantize`
  kBias,
  kRouter,  // a linear weight that decides routing: never quantized
};

struct TensorRoleInfo {
  TensorRole role;
  // The Hugging Face name; each "%d" is replaced by the layer, then the routed expert.
  const char* name_format;
  TensorScope scope;
  TensorKind kind;
  std::vector<int64_t> (*shape)(const ModelConfig& config);
  const char* shape_why;  // which config keys the shape comes from, for error messages
  // Whether a checkpoint of `config` holds the tensor (in `layer`, for layer and expert roles).
  bool (*present)(const ModelConfig& config, int64_t layer);
};

// The whole table, in TensorRole order.
std::span<const TensorRoleInfo> TensorRoleTable();
const TensorRoleInfo& RoleInfo(TensorRole role);

// The tensor's name: `layer` for layer and expert roles, `expert` for expert roles.
std::string TensorName(TensorRole role, int64_t layer = -1, int64_t expert = -1);
// The tensor's shape for `config`.
std::vector<int64_t> TensorShape(TensorRole role, const ModelConfig& config);
// Whether a checkpoint of `config` holds the role (in `layer`, for layer and expert roles).
bool HasTensor(TensorRole role, const ModelConfig& config, int64_t layer = -1);
// The F16 scales of a Q8_0 (int8) tensor: "<name>_scale", [rows, cols / 32].
std::string Q8ScaleName(const std::string& name);

// The three matrices of a SwiGLU MLP: dense layers, the shared experts, each routed expert.
struct MlpRoles {
  TensorRole gate, up, down;
};
inline constexpr MlpRoles kDenseMlpRoles{TensorRole::kDenseGate, TensorRole::kDenseUp,
                                         TensorRole::kDenseDown};
inline constexpr MlpRoles kSharedMlpRoles{TensorRole::kSharedGate, TensorRole::kSharedUp,
                                          TensorRole::kSharedDown};
inline constexpr MlpRoles kRoutedExpertRoles{TensorRole::kExpertGate, TensorRole::kExpertUp,
                                             TensorRole::kExpertDown};

// An attention projection's weight and (attention_bias only) bias.
struct ProjectionRoles {
  TensorRole weight, bias;
};
inline constexpr ProjectionRoles kAttentionProjections[] = {
    {TensorRole::kAttnQ, TensorRole::kAttnQBias},
    {TensorRole::kAttnK, TensorRole::kAttnKBias},
    {TensorRole::kAttnV, TensorRole::kAttnVBias},
    {TensorRole::kAttnO, TensorRole::kAttnOBias},
};

// One tensor of a checkpoint.
struct CheckpointTensor {
  TensorRole role;
  int64_t layer = -1;   // layer and expert roles
  int64_t expert = -1;  // expert roles
  std::string name;
  std::vector<int64_t> shape;
};

// Every tensor a checkpoint of `config` holds, in checkpoint order: the embedding, then layer by
// layer (a MoE layer's routed experts one by one, each gate, up, down), the final norm, the head.
std::vector<CheckpointTensor> CheckpointTensors(const ModelConfig& config);

}  // namespace dsmoe
