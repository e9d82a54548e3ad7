#include "core/model/make_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/io/safetensors.h"

namespace dsmoe {

namespace {

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  enum class Init { kLinear, kEmbedding, kNorm, kBias } init;
};

std::vector<TensorPlan> PlanTensors(const ModelConfig& c) {
  using I = TensorPlan::Init;
  const int64_t H = c.hidden_size, hd = c.head_dim();
  const int64_t q_out = c.num_attention_heads * hd, kv_out = c.num_key_value_heads * hd;
  std::vector<TensorPlan> plan;
  plan.push_back({"model.embed_tokens.weight", {c.vocab_size, H}, I::kEmbedding});
  auto mlp = [&](const std::string& p, int64_t width) {
    plan.push_back({p + ".gate_proj.weight", {width, H}, I::kLinear});
    plan.push_back({p + ".up_proj.weight", {width, H}, I::kLinear});
    plan.push_back({p + ".down_proj.weight", {H, width}, I::kLinear});
  };
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) {
    const std::string p = "model.layers." + std::to_string(i) + ".";
    plan.push_back({p + "input_layernorm.weight", {H}, I::kNorm});
    for (auto [name, out, in] : {std::tuple{"q_proj", q_out, H}, std::tuple{"k_proj", kv_out, H},
                                 std::tuple{"v_proj", kv_out, H}, std::tuple{"o_proj", H, q_out}}) {
      plan.push_back({p + "self_attn." + name + ".weight", {out, in}, I::kLinear});
      if (c.attention_bias) plan.push_back({p + "self_attn." + name + ".bias", {out}, I::kBias});
    }
    plan.push_back({p + "post_attention_layernorm.weight", {H}, I::kNorm});
    if (!c.IsMoeLayer(i)) {
      mlp(p + "mlp", c.intermediate_size);
      continue;
    }
    plan.push_back({p + "mlp.gate.weight", {c.n_routed_experts, H}, I::kLinear});
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      mlp(p + "mlp.experts." + std::to_string(e), c.moe_intermediate_size);
    }
    if (c.n_shared_experts > 0) mlp(p + "mlp.shared_experts", c.shared_intermediate_size());
  }
  plan.push_back({"model.norm.weight", {H}, I::kNorm});
  if (!c.tie_word_embeddings) plan.push_back({"lm_head.weight", {c.vocab_size, H}, I::kLinear});
  return plan;
}

// SplitMix64: tiny, fast, and good enough for test weights.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t Next() {
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  // Uniform in [-1, 1).
  float Symmetric() {
    return static_cast<float>(static_cast<double>(Next() >> 11) * 0x1.0p-52 - 1.0);
  }

 private:
  uint64_t state_;
};

uint64_t HashName(const std::string& s, uint64_t seed) {
  uint64_t h = 1469598103934665603ull ^ seed;  // FNV-1a
  for (unsigned char ch : s) h = (h ^ ch) * 1099511628211ull;
  return h;
}

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status WriteJson(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path);
  out << text;
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat(path.string(), ": write failed"));
  return absl::OkStatus();
}

}  // namespace

std::vector<std::string> PresetNames() { return {"tiny", "gshard", "small", "medium"}; }

absl::StatusOr<ModelConfig> PresetConfig(const std::string& name) {
  ModelConfig c;
  c.bos_token_id = 0;
  c.eos_token_ids = {1};
  c.max_position_embeddings = 4096;
  c.torch_dtype = "float32";
  auto shape = [&](int64_t layers, int64_t hidden, int64_t heads, int64_t routed, int64_t width,
                   int64_t shared, int64_t top_k, int64_t first_dense, int64_t vocab) {
    c.num_hidden_layers = layers;
    c.hidden_size = hidden;
    c.num_attention_heads = heads;
    c.num_key_value_heads = heads;
    c.n_routed_experts = routed;
    c.moe_intermediate_size = width;
    c.n_shared_experts = shared;
    c.num_experts_per_tok = top_k;
    c.first_k_dense_replace = first_dense;
    c.vocab_size = vocab;
    // The dense layers match a MoE layer's activated width, as in DeepSeekMoE 16B (10944 ≈ 8 ×
    // 1408).
    c.intermediate_size = (shared + top_k) * width;
  };
  if (name == "tiny") {
    shape(4, 64, 4, 16, 32, 2, 4, 1, 512);
  } else if (name == "gshard") {
    shape(4, 64, 4, 8, 72, 0, 2, 0, 512);
    c.intermediate_size = 2 * 72;
  } else if (name == "small") {
    shape(8, 512, 8, 64, 256, 2, 6, 1, 8192);
  } else if (name == "medium") {
    shape(12, 1024, 16, 64, 704, 2, 6, 1, 32000);
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown preset '", name, "' (presets: tiny, gshard, small, medium)"));
  }
  return c;
}

ParameterCount CountParameters(const ModelConfig& c) {
  ParameterCount count;
  for (const TensorPlan& t : PlanTensors(c)) {
    const int64_t n = NumElements(t.shape);
    count.total += n;
  }
  // Active, as the DeepSeekMoE paper counts it (16B: 2.8B): all but the routed experts a token
  // does not choose. (Of the embedding table a token reads one row; weight bytes read per
  // token are the benchmark's business.)
  const int64_t expert = 3 * c.hidden_size * c.moe_intermediate_size;
  count.active =
      count.total - c.NumMoeLayers() * (c.n_routed_experts - c.num_experts_per_tok) * expert;
  return count;
}

namespace {

bool IsRouter(const std::string& name) {
  const std::string suffix = ".mlp.gate.weight";
  return name.size() > suffix.size() &&
         name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

absl::Status WriteRandomCheckpoint(const ModelConfig& config, const CheckpointWriteOptions& options,
                                   const std::string& dir) {
  namespace fs = std::filesystem;
  DSMOE_RETURN_IF_ERROR(config.Validate("generated config"));
  for (int64_t e : options.router_bias_experts) {
    if (e < 0 || e >= config.n_routed_experts) {
      return absl::InvalidArgumentError(
          absl::StrCat("router bias: expert ", e, " outside [0, ", config.n_routed_experts, ")"));
    }
  }
  if (!(options.router_bias > 0) || !std::isfinite(options.router_bias)) {
    return absl::InvalidArgumentError("router bias must be a positive number");
  }
  if (options.num_shards < 1) return absl::InvalidArgumentError("--shards must be >= 1");
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat(dir, ": cannot create: ", ec.message()));

  ModelConfig written = config;
  written.torch_dtype = options.dtype == DType::kF32    ? "float32"
                        : options.dtype == DType::kBF16 ? "bfloat16"
                                                        : "float16";
  DSMOE_RETURN_IF_ERROR(WriteJson(fs::path(dir) / "config.json", written.ToJson()));
  DSMOE_RETURN_IF_ERROR(WriteJson(fs::path(dir) / "generation_config.json",
                                  GenerationConfig::FromModel(written).ToJson()));

  const std::vector<TensorPlan> plan = PlanTensors(config);
  const int64_t elem = static_cast<int64_t>(DTypeSize(options.dtype));
  int64_t total_bytes = 0;
  for (const TensorPlan& t : plan) total_bytes += NumElements(t.shape) * elem;
  const int shards = std::min<int>(options.num_shards, static_cast<int>(plan.size()));

  // Contiguous runs of tensors, cut where the running size passes each 1/shards mark.
  std::vector<std::vector<const TensorPlan*>> shard_tensors(shards);
  int64_t running = 0;
  for (const TensorPlan& t : plan) {
    int s = static_cast<int>(running * shards / std::max<int64_t>(total_bytes, 1));
    s = std::min(s, shards - 1);
    shard_tensors[s].push_back(&t);
    running += NumElements(t.shape) * elem;
  }
  nlohmann::ordered_json weight_map;
  std::vector<float> values;
  std::vector<uint16_t> halves;
  for (int s = 0; s < shards; ++s) {
    if (shard_tensors[s].empty()) continue;
    char name[64];
    if (shards == 1) {
      std::snprintf(name, sizeof(name), "model.safetensors");
    } else {
      std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", s + 1, shards);
    }
    std::vector<SafetensorsWriter::Spec> specs;
    for (const TensorPlan* t : shard_tensors[s]) {
      specs.push_back({t->name, options.dtype, t->shape});
      weight_map[t->name] = name;
    }
    DSMOE_ASSIGN_OR_RETURN(auto writer,
                           SafetensorsWriter::Create((fs::path(dir) / name).string(), specs));
    for (const TensorPlan* t : shard_tensors[s]) {
      const int64_t n = NumElements(t->shape);
      Rng rng(HashName(t->name, options.seed));
      values.resize(n);
      const float std_dev =
          t->init == TensorPlan::Init::kLinear
              ? static_cast<float>(1.0 / std::sqrt(static_cast<double>(t->shape.back())))
          : t->init == TensorPlan::Init::kEmbedding ? 1.0f
                                                    : 0.1f;
      const float half_width = std_dev * std::sqrt(3.0f);  // uniform[-a, a] has std a/√3
      for (int64_t i = 0; i < n; ++i) {
        values[i] = t->init == TensorPlan::Init::kNorm ? 1.0f + 0.25f * rng.Symmetric()
                                                       : half_width * rng.Symmetric();
      }
      if (IsRouter(t->name)) {  // [E, H]: scale the biased experts' rows
        const int64_t H = t->shape.back();
        for (int64_t e : options.router_bias_experts) {
          for (int64_t h = 0; h < H; ++h) values[e * H + h] *= options.router_bias;
        }
      }
      if (options.dtype == DType::kF32) {
        DSMOE_RETURN_IF_ERROR(writer->Append(values.data(), n * sizeof(float)));
      } else {
        halves.resize(n);
        for (int64_t i = 0; i < n; ++i) {
          halves[i] = options.dtype == DType::kBF16 ? F32ToBf16(values[i]) : F32ToF16(values[i]);
        }
        DSMOE_RETURN_IF_ERROR(writer->Append(halves.data(), n * sizeof(uint16_t)));
      }
    }
    DSMOE_RETURN_IF_ERROR(writer->Finish());
  }
  if (shards > 1) {
    nlohmann::ordered_json index;
    index["metadata"] = {{"total_size", total_bytes}};
    index["weight_map"] = weight_map;
    DSMOE_RETURN_IF_ERROR(
        WriteJson(fs::path(dir) / "model.safetensors.index.json", index.dump(2) + "\n"));
  } else {
    fs::remove(fs::path(dir) / "model.safetensors.index.json", ec);
  }
  return absl::OkStatus();
}

}  // namespace dsmoe
