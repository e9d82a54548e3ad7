#include "core/model/config.h"

#include <nlohmann/json.hpp>

namespace dsmoe {

namespace {

using Json = nlohmann::json;

// Reads typed keys from a JSON object, collecting the first error with the key's name.
class KeyReader {
 public:
  KeyReader(const Json& obj, const std::string& source) : obj_(obj), source_(source) {}

  void Int(const char* key, int64_t* out, bool nullable_as_zero = false) {
    const Json* v = Find(key);
    if (v == nullptr) return;
    if (v->is_null() && nullable_as_zero) {
      *out = 0;
    } else if (v->is_number_integer()) {
      *out = v->get<int64_t>();
    } else {
      Fail(key, nullable_as_zero ? "an integer or null" : "an integer", *v);
    }
  }
  void Float(const char* key, double* out) {
    const Json* v = Find(key);
    if (v == nullptr) return;
    if (v->is_number()) {
      *out = v->get<double>();
    } else {
      Fail(key, "a number", *v);
    }
  }
  void Bool(const char* key, bool* out) {
    const Json* v = Find(key);
    if (v == nullptr) return;
    if (v->is_boolean()) {
      *out = v->get<bool>();
    } else {
      Fail(key, "true or false", *v);
    }
  }
  void String(const char* key, std::string* out) {
    const Json* v = Find(key);
    if (v == nullptr) return;
    if (v->is_string()) {
      *out = v->get<std::string>();
    } else if (!v->is_null()) {
      Fail(key, "a string", *v);
    }
  }
  // HF allows eos_token_id to be one id or a list of ids.
  void IntOrIntList(const char* key, std::vector<int64_t>* out) {
    const Json* v = Find(key);
    if (v == nullptr || v->is_null()) return;
    if (v->is_number_integer()) {
      *out = {v->get<int64_t>()};
      return;
    }
    if (v->is_array()) {
      std::vector<int64_t> ids;
      for (const Json& e : *v) {
        if (!e.is_number_integer()) return Fail(key, "an integer or a list of integers", *v);
        ids.push_back(e.get<int64_t>());
      }
      *out = std::move(ids);
      return;
    }
    Fail(key, "an integer or a list of integers", *v);
  }
  void Rope(const char* key, RopeScaling* out) {
    const Json* v = Find(key);
    if (v == nullptr || v->is_null()) return;
    if (!v->is_object())
      return Fail(key, "an object like {\"type\": \"linear\", \"factor\": 2.0} or null", *v);
    auto type = v->find("type");
    if (type == v->end()) type = v->find("rope_type");  // newer HF spelling
    auto factor = v->find("factor");
    if (type == v->end() || !type->is_string() || factor == v->end() || !factor->is_number()) {
      return Fail(key, "an object with string 'type' and number 'factor'", *v);
    }
    const std::string t = type->get<std::string>();
    if (t == "linear") {
      out->type = RopeScaling::Type::kLinear;
    } else {
      status_.Update(absl::InvalidArgumentError(absl::StrCat(
          source_, ": rope_scaling type '", t, "' is not supported (supported: linear, or null)")));
      return;
    }
    out->factor = factor->get<double>();
    if (!(out->factor > 0)) {
      status_.Update(absl::InvalidArgumentError(
          absl::StrCat(source_, ": rope_scaling.factor must be > 0, got ", factor->dump())));
    }
  }
  const absl::Status& status() const { return status_; }

 private:
  const Json* Find(const char* key) {
    auto it = obj_.find(key);
    return it == obj_.end() ? nullptr : &*it;
  }
  void Fail(const char* key, const char* expected, const Json& got) {
    std::string shown = got.dump();
    if (shown.size() > 60) shown = shown.substr(0, 57) + "...";
    status_.Update(absl::InvalidArgumentError(
        absl::StrCat(source_, ": key '", key, "' must be ", expected, ", got ", shown)));
  }
  const Json& obj_;
  const std::string& source_;
  absl::Status status_;
};

}  // namespace

int64_t ModelConfig::NumMoeLayers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) n += IsMoeLayer(i) ? 1 : 0;
  return n;
}

int64_t ModelConfig::MaxContext() const {
  const double stretch =
      rope_scaling.type == RopeScaling::Type::kLinear && rope_scaling.factor > 1.0
          ? rope_scaling.factor
          : 1.0;
  return static_cast<int64_t>(static_cast<double>(max_position_embeddings) * stretch);
}

absl::StatusOr<ModelConfig> ModelConfig::FromJson(const std::string& text,
                                                  const std::string& source) {
  Json obj = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (obj.is_discarded())
    return absl::InvalidArgumentError(absl::StrCat(source, ": not valid JSON"));
  if (!obj.is_object())
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  ModelConfig c;
  KeyReader r(obj, source);
  r.String("model_type", &c.model_type);
  r.Int("vocab_size", &c.vocab_size);
  r.Int("hidden_size", &c.hidden_size);
  r.Int("intermediate_size", &c.intermediate_size);
  r.Int("moe_intermediate_size", &c.moe_intermediate_size);
  r.Int("num_hidden_layers", &c.num_hidden_layers);
  r.Int("num_attention_heads", &c.num_attention_heads);
  c.num_key_value_heads = c.num_attention_heads;  // HF: None means "same as heads"
  r.Int("num_key_value_heads", &c.num_key_value_heads, /*nullable_as_zero=*/true);
  if (c.num_key_value_heads == 0) c.num_key_value_heads = c.num_attention_heads;
  r.Int("n_shared_experts", &c.n_shared_experts, true);
  r.Int("n_routed_experts", &c.n_routed_experts, true);
  r.Int("num_experts_per_tok", &c.num_experts_per_tok, true);
  r.Int("first_k_dense_replace", &c.first_k_dense_replace);
  r.Int("moe_layer_freq", &c.moe_layer_freq);
  r.Bool("norm_topk_prob", &c.norm_topk_prob);
  r.String("scoring_func", &c.scoring_func);
  r.String("topk_method", &c.topk_method);
  r.Int("n_group", &c.n_group, true);
  r.Int("topk_group", &c.topk_group, true);
  r.Float("routed_scaling_factor", &c.routed_scaling_factor);
  if (c.n_group == 0) c.n_group = 1;
  if (c.topk_group == 0) c.topk_group = 1;
  r.String("hidden_act", &c.hidden_act);
  r.Float("rms_norm_eps", &c.rms_norm_eps);
  r.Float("rope_theta", &c.rope_theta);
  r.Rope("rope_scaling", &c.rope_scaling);
  r.Int("max_position_embeddings", &c.max_position_embeddings);
  r.Bool("tie_word_embeddings", &c.tie_word_embeddings);
  r.Bool("attention_bias", &c.attention_bias);
  r.Int("bos_token_id", &c.bos_token_id, true);
  r.IntOrIntList("eos_token_id", &c.eos_token_ids);
  r.String("torch_dtype", &c.torch_dtype);
  DSMOE_RETURN_IF_ERROR(r.status());
  DSMOE_RETURN_IF_ERROR(c.Validate(source));
  return c;
}

absl::Status ModelConfig::Validate(const std::string& source) const {
  auto bad = [&](auto&&... parts) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": ", parts...));
  };
  if (model_type != "deepseek") {
    return bad(
        "model_type '", model_type,
        "' is not supported; dsmoe serves DeepSeekMoE checkpoints (model_type \"deepseek\")");
  }
  struct Positive {
    const char* key;
    int64_t value;
  };
  for (const Positive& p :
       {Positive{"vocab_size", vocab_size}, Positive{"hidden_size", hidden_size},
        Positive{"num_hidden_layers", num_hidden_layers},
        Positive{"num_attention_heads", num_attention_heads},
        Positive{"num_key_value_heads", num_key_value_heads},
        Positive{"moe_layer_freq", moe_layer_freq},
        Positive{"max_position_embeddings", max_position_embeddings}}) {
    if (p.value <= 0) return bad("key '", p.key, "' must be > 0, got ", p.value);
  }
  // Upper bounds far above any DeepSeekMoE checkpoint (V3: 61 layers, hidden 7168, 256 routed
  // experts, vocab 129280), so that everything sized from a config — per-layer loops, parameter
  // counts, the context — stays within int64 (the config fuzz target found hangs and overflows).
  struct AtMost {
    const char* key;
    int64_t value, limit;
  };
  for (const AtMost& m :
       {AtMost{"num_hidden_layers", num_hidden_layers, 1 << 10},
        AtMost{"hidden_size", hidden_size, 1 << 16}, AtMost{"vocab_size", vocab_size, 1 << 24},
        AtMost{"intermediate_size", intermediate_size, 1 << 20},
        AtMost{"moe_intermediate_size", moe_intermediate_size, 1 << 20},
        AtMost{"num_attention_heads", num_attention_heads, 1 << 12},
        AtMost{"n_routed_experts", n_routed_experts, 1 << 12},
        AtMost{"n_shared_experts", n_shared_experts, 1 << 12},
        AtMost{"max_position_embeddings", max_position_embeddings, 1 << 24}}) {
    if (m.value > m.limit) return bad("key '", m.key, "' must be <= ", m.limit, ", got ", m.value);
  }
  if (rope_scaling.factor > 1024) {
    return bad("rope_scaling.factor must be <= 1024, got ", rope_scaling.factor);
  }
  if (hidden_size % num_attention_heads != 0) {
    return bad("hidden_size ", hidden_size, " is not divisible by num_attention_heads ",
               num_attention_heads);
  }
  if (num_attention_heads % num_key_value_heads != 0) {
    return bad("num_attention_heads ", num_attention_heads,
               " is not divisible by num_key_value_heads ", num_key_value_heads);
  }
  if (head_dim() % 2 != 0)
    return bad("head_dim ", head_dim(), " must be even for rotary embeddings");
  if (first_k_dense_replace < 0) return bad("first_k_dense_replace must be >= 0");
  if (n_shared_experts < 0 || n_routed_experts < 0) return bad("expert counts must be >= 0");
  bool any_dense = false;
  for (int64_t i = 0; i < num_hidden_layers; ++i) any_dense |= !IsMoeLayer(i);
  if (any_dense && intermediate_size <= 0) {
    return bad("intermediate_size must be > 0 (the model has dense layers), got ",
               intermediate_size);
  }
  if (n_routed_experts > 0) {
    if (moe_intermediate_size <= 0) return bad("moe_intermediate_size must be > 0");
    if (num_experts_per_tok <= 0 || num_experts_per_tok > n_routed_experts) {
      return bad("num_experts_per_tok must be in [1, n_routed_experts=", n_routed_experts,
                 "], got ", num_experts_per_tok);
    }
    if (scoring_func != "softmax") {
      return bad("scoring_func '", scoring_func, "' is not supported (DeepseekConfig: softmax)");
    }
    if (topk_method != "greedy" && topk_method != "group_limited_greedy") {
      return bad("topk_method '", topk_method, "' is not supported (greedy, group_limited_greedy)");
    }
    if (n_group < 1 || n_group > 64 || n_routed_experts % n_group != 0 || topk_group < 1 ||
        topk_group > n_group) {
      return bad("n_group ", n_group, " / topk_group ", topk_group, " must divide the ",
                 n_routed_experts,
                 " routed experts into at most 64 groups and keep 1..n_group of them");
    }
    if (topk_method == "group_limited_greedy" &&
        topk_group * (n_routed_experts / n_group) < num_experts_per_tok) {
      return bad("the ", topk_group, " groups kept hold fewer experts than num_experts_per_tok ",
                 num_experts_per_tok);
    }
  }
  if (hidden_act != "silu") return bad("hidden_act '", hidden_act, "' is not supported (silu)");
  if (!(rms_norm_eps > 0)) return bad("rms_norm_eps must be > 0");
  if (!(rope_theta > 0)) return bad("rope_theta must be > 0");
  for (int64_t id : eos_token_ids) {
    if (id < 0 || id >= vocab_size)
      return bad("eos_token_id ", id, " is outside the vocabulary [0, ", vocab_size, ")");
  }
  return absl::OkStatus();
}

std::string ModelConfig::ToJson() const {
  nlohmann::ordered_json j;
  j["architectures"] = {"DeepseekForCausalLM"};
  j["attention_bias"] = attention_bias;
  j["attention_dropout"] = 0.0;
  j["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekConfig"},
                   {"AutoModel", "modeling_deepseek.DeepseekModel"},
                   {"AutoModelForCausalLM", "modeling_deepseek.DeepseekForCausalLM"}};
  j["aux_loss_alpha"] = 0.001;
  j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) {
    j["eos_token_id"] = eos_token_ids[0];
  } else {
    j["eos_token_id"] = eos_token_ids;
  }
  j["first_k_dense_replace"] = first_k_dense_replace;
  j["hidden_act"] = hidden_act;
  j["hidden_size"] = hidden_size;
  j["initializer_range"] = 0.02;
  j["intermediate_size"] = intermediate_size;
  j["max_position_embeddings"] = max_position_embeddings;
  j["model_type"] = model_type;
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["moe_layer_freq"] = moe_layer_freq;
  j["n_routed_experts"] = n_routed_experts > 0 ? Json(n_routed_experts) : Json(nullptr);
  j["n_shared_experts"] = n_shared_experts > 0 ? Json(n_shared_experts) : Json(nullptr);
  j["norm_topk_prob"] = norm_topk_prob;
  j["num_attention_heads"] = num_attention_heads;
  j["num_experts_per_tok"] = num_experts_per_tok > 0 ? Json(num_experts_per_tok) : Json(nullptr);
  j["num_hidden_layers"] = num_hidden_layers;
  j["num_key_value_heads"] = num_key_value_heads;
  j["pretraining_tp"] = 1;
  j["rms_norm_eps"] = rms_norm_eps;
  if (rope_scaling.type == RopeScaling::Type::kLinear) {
    j["rope_scaling"] = {{"type", "linear"}, {"factor", rope_scaling.factor}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_theta"] = rope_theta;
  j["scoring_func"] = scoring_func;
  if (topk_method != "greedy") {
    j["topk_method"] = topk_method;
    j["n_group"] = n_group;
    j["topk_group"] = topk_group;
  }
  if (routed_scaling_factor != 1.0) j["routed_scaling_factor"] = routed_scaling_factor;
  j["seq_aux"] = true;
  j["tie_word_embeddings"] = tie_word_embeddings;
  j["torch_dtype"] = torch_dtype;
  j["transformers_version"] = "4.36.2";
  j["use_cache"] = true;
  j["vocab_size"] = vocab_size;
  return j.dump(2) + "\n";
}

GenerationConfig GenerationConfig::FromModel(const ModelConfig& model) {
  return GenerationConfig{model.bos_token_id, model.eos_token_ids};
}

absl::StatusOr<GenerationConfig> GenerationConfig::FromJson(const std::string& text,
                                                            const std::string& source,
                                                            const ModelConfig& model) {
  Json obj = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (obj.is_discarded() || !obj.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  GenerationConfig g = FromModel(model);
  KeyReader r(obj, source);
  r.Int("bos_token_id", &g.bos_token_id, true);
  r.IntOrIntList("eos_token_id", &g.eos_token_ids);
  DSMOE_RETURN_IF_ERROR(r.status());
  for (int64_t id : g.eos_token_ids) {
    if (id < 0 || id >= model.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          source, ": eos_token_id ", id, " is outside the vocabulary [0, ", model.vocab_size, ")"));
    }
  }
  return g;
}

std::string GenerationConfig::ToJson() const {
  nlohmann::ordered_json j;
  j["_from_model_config"] = true;
  j["bos_token_id"] = bos_token_id;
  if (eos_token_ids.size() == 1) {
    j["eos_token_id"] = eos_token_ids[0];
  } else {
    j["eos_token_id"] = eos_token_ids;
  }
  j["transformers_version"] = "4.36.2";
  return j.dump(2) + "\n";
}

}  // namespace dsmoe
