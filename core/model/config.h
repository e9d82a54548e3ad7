// The model's shape and semantics, read from a checkpoint's config.json with exactly the keys
// and defaults of Hugging Face's DeepseekConfig (model_type "deepseek"). Model shapes always
// come from here, never from flags.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/util/status.h"

namespace dsmoe {

struct RopeScaling {
  enum class Type { kNone, kLinear };
  Type type = Type::kNone;
  double factor = 1.0;  // linear: positions are divided by it
};

struct ModelConfig {
  std::string model_type = "deepseek";
  int64_t vocab_size = 102400;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 11008;     // width of the dense layers' MLP
  int64_t moe_intermediate_size = 1407;  // width of one routed (and one shared) expert
  int64_t num_hidden_layers = 30;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;  // < heads: grouped-query; 1: multi-query
  int64_t n_shared_experts = 0;      // 0 when the config says null (or 0): no shared experts
  int64_t n_routed_experts = 0;      // 0 when null: a dense model
  int64_t num_experts_per_tok = 0;   // top-k
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  bool norm_topk_prob = false;
  std::string scoring_func = "softmax";
  // Not in DeepseekConfig (v1); read when a config carries them (later DeepSeek gates).
  std::string topk_method = "greedy";  // or "group_limited_greedy"
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  std::string hidden_act = "silu";
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScaling rope_scaling;
  int64_t max_position_embeddings = 2048;
  bool tie_word_embeddings = false;
  bool attention_bias = false;
  int64_t bos_token_id = 100000;
  std::vector<int64_t> eos_token_ids = {100001};
  std::string torch_dtype = "bfloat16";

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
  // HF: layer i is MoE iff n_routed_experts and i >= first_k_dense_replace and
  // i % moe_layer_freq == 0; otherwise a dense MLP of width intermediate_size.
  bool IsMoeLayer(int64_t layer) const {
    return n_routed_experts > 0 && layer >= first_k_dense_replace && layer % moe_layer_freq == 0;
  }
  int64_t NumMoeLayers() const;
  // Positions a sequence may reach: max_position_embeddings, stretched by linear RoPE scaling.
  int64_t MaxContext() const;
  int64_t shared_intermediate_size() const { return n_shared_experts * moe_intermediate_size; }

  // Parses config.json text; `source` names the file in errors. Every present key is
  // type-checked; absent keys take DeepseekConfig's defaults; the result is validated.
  static absl::StatusOr<ModelConfig> FromJson(const std::string& text, const std::string& source);
  // config.json text as Hugging Face writes it for DeepseekForCausalLM.
  std::string ToJson() const;
  // Consistency of the shapes (heads divide hidden, top-k <= experts, ...).
  absl::Status Validate(const std::string& source) const;
};

// generation_config.json: the token ids generation uses. Absent file or keys fall back to the
// model config's.
struct GenerationConfig {
  int64_t bos_token_id = 0;
  std::vector<int64_t> eos_token_ids;
  static absl::StatusOr<GenerationConfig> FromJson(const std::string& text,
                                                   const std::string& source,
                                                   const ModelConfig& model);
  static GenerationConfig FromModel(const ModelConfig& model);
  std::string ToJson() const;
};

}  // namespace dsmoe
