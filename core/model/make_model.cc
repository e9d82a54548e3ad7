#include "core/model/make_model.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/io/safetensors.h"
#include "core/model/tensor_roles.h"

namespace dsmoe {

namespace {

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

namespace {

// The tensor's values, as fp32: depend only on (seed, name).
void RandomValues(const CheckpointTensor& t, const CheckpointWriteOptions& options,
                  std::vector<float>& values) {
  const TensorKind kind = RoleInfo(t.role).kind;
  const int64_t n = NumElements(t.shape);
  Rng rng(HashName(t.name, options.seed));
  values.resize(n);
  const bool linear = kind == TensorKind::kLinear || kind == TensorKind::kRouter;
  const float std_dev =
      linear                           ? static_cast<float>(1.0 /
                                  std::sqrt(static_cast<double>(t.shape.back())))  // 1/sqrt(fan_in)
      : kind == TensorKind::kEmbedding ? 1.0f
                                       : 0.1f;
  const float half_width = std_dev * std::sqrt(3.0f);  // uniform[-a, a] has std a/√3
  for (int64_t i = 0; i < n; ++i) {
    values[i] =
        kind == TensorKind::kNorm ? 1.0f + 0.25f * rng.Symmetric() : half_width * rng.Symmetric();
  }
  if (kind == TensorKind::kRouter) {  // [E, H]: scale the biased experts' rows
    const int64_t H = t.shape.back();
    for (int64_t e : options.router_bias_experts) {
      for (int64_t h = 0; h < H; ++h) values[e * H + h] *= options.router_bias;
    }
  }
}

// Writes one safetensors file holding `tensors`.
absl::Status WriteShard(const std::string& path,
                        const std::vector<const CheckpointTensor*>& tensors,
                        const CheckpointWriteOptions& options) {
  std::vector<SafetensorsWriter::Spec> specs;
  for (const CheckpointTensor* t : tensors) specs.push_back({t->name, options.dtype, t->shape});
  DSMOE_ASSIGN_OR_RETURN(auto writer, SafetensorsWriter::Create(path, specs));
  std::vector<float> values;
  std::vector<uint16_t> halves;
  for (const CheckpointTensor* t : tensors) {
    RandomValues(*t, options, values);
    const int64_t n = static_cast<int64_t>(values.size());
    if (options.dtype == DType::kF32) {
      DSMOE_RETURN_IF_ERROR(writer->Append(values.data(), n * sizeof(float)));
      continue;
    }
    halves.resize(n);
    for (int64_t i = 0; i < n; ++i) {
      halves[i] = options.dtype == DType::kBF16 ? F32ToBf16(values[i]) : F32ToF16(values[i]);
    }
    DSMOE_RETURN_IF_ERROR(writer->Append(halves.data(), n * sizeof(uint16_t)));
  }
  return writer->Finish();
}

absl::Status CheckWriteOptions(const ModelConfig& config, const CheckpointWriteOptions& options) {
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
  return absl::OkStatus();
}

}  // namespace

absl::Status WriteRandomCheckpoint(const ModelConfig& config, const CheckpointWriteOptions& options,
                                   const std::string& dir) {
  namespace fs = std::filesystem;
  DSMOE_RETURN_IF_ERROR(CheckWriteOptions(config, options));
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

  const std::vector<CheckpointTensor> plan = CheckpointTensors(config);
  const int64_t elem = static_cast<int64_t>(DTypeSize(options.dtype));
  int64_t total_bytes = 0;
  for (const CheckpointTensor& t : plan) total_bytes += NumElements(t.shape) * elem;
  const int shards = std::min<int>(options.num_shards, static_cast<int>(plan.size()));

  // Contiguous runs of tensors, cut where the running size passes each 1/shards mark.
  std::vector<std::vector<const CheckpointTensor*>> shard_tensors(shards);
  int64_t running = 0;
  for (const CheckpointTensor& t : plan) {
    int s = static_cast<int>(running * shards / std::max<int64_t>(total_bytes, 1));
    s = std::min(s, shards - 1);
    shard_tensors[s].push_back(&t);
    running += NumElements(t.shape) * elem;
  }
  nlohmann::ordered_json weight_map;
  for (int s = 0; s < shards; ++s) {
    if (shard_tensors[s].empty()) continue;
    char name[64];
    if (shards == 1) {
      std::snprintf(name, sizeof(name), "model.safetensors");
    } else {
      std::snprintf(name, sizeof(name), "model-%05d-of-%05d.safetensors", s + 1, shards);
    }
    for (const CheckpointTensor* t : shard_tensors[s]) weight_map[t->name] = name;
    DSMOE_RETURN_IF_ERROR(WriteShard((fs::path(dir) / name).string(), shard_tensors[s], options));
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
