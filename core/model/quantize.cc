#include "core/model/quantize.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <vector>

#include "core/io/checkpoint.h"
#include "core/io/safetensors.h"
#include "core/model/config.h"
#include "core/model/tensor_roles.h"

namespace dsmoe {

namespace {

namespace fs = std::filesystem;

// The linear layers whose weights are quantized (tensor_roles.h: TensorKind::kLinear); the
// embeddings, norms, biases and routers, and any tensor the model does not use, are copied.
std::set<std::string> QuantizedNames(const ModelConfig& config) {
  std::set<std::string> names;
  for (const CheckpointTensor& t : CheckpointTensors(config)) {
    if (RoleInfo(t.role).kind == TensorKind::kLinear) names.insert(t.name);
  }
  return names;
}

bool IsQuantizedLinear(const std::set<std::string>& linear, const std::string& name,
                       const TensorView& t) {
  return t.shape.size() == 2 && t.shape[1] % kQ8Block == 0 && t.dtype != DType::kI8 &&
         linear.count(name) != 0;
}

}  // namespace

void QuantizeRowQ8(const float* row, int64_t n, int8_t* values, uint16_t* scales) {
  for (int64_t b = 0; b < n / kQ8Block; ++b) {
    const float* x = row + b * kQ8Block;
    float amax = 0.0f;
    for (int64_t i = 0; i < kQ8Block; ++i) amax = std::max(amax, std::fabs(x[i]));
    // Quantize against the scale as stored (F16), so values and scale agree exactly.
    const uint16_t d16 = F32ToF16(amax / 127.0f);
    const float d = F16ToF32(d16);
    scales[b] = d16;
    for (int64_t i = 0; i < kQ8Block; ++i) {
      const float q = d > 0.0f ? std::nearbyint(x[i] / d) : 0.0f;
      values[b * kQ8Block + i] = static_cast<int8_t>(std::clamp(q, -127.0f, 127.0f));
    }
  }
}

absl::StatusOr<QuantizeReport> QuantizeCheckpoint(const std::string& in_dir,
                                                  const std::string& out_dir) {
  DSMOE_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(in_dir));
  DSMOE_ASSIGN_OR_RETURN(std::string config_text, ckpt->ReadJsonFile("config.json"));
  DSMOE_ASSIGN_OR_RETURN(const ModelConfig model,
                         ModelConfig::FromJson(config_text, in_dir + "/config.json"));
  const std::set<std::string> linear = QuantizedNames(model);
  std::error_code ec;
  if (fs::equivalent(in_dir, out_dir, ec))
    return absl::InvalidArgumentError("--out must differ from --model");
  fs::create_directories(out_dir, ec);
  if (ec)
    return absl::PermissionDeniedError(absl::StrCat(out_dir, ": cannot create: ", ec.message()));

  QuantizeReport report;
  std::vector<std::string> names = ckpt->TensorNamesInFileOrder();
  std::vector<SafetensorsWriter::Spec> specs;
  for (const std::string& name : names) {
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt->Tensor(name));
    if (IsQuantizedLinear(linear, name, t)) {
      specs.push_back({name, DType::kI8, t.shape});
      specs.push_back({Q8ScaleName(name), DType::kF16, {t.shape[0], t.shape[1] / kQ8Block}});
    } else {
      specs.push_back({name, t.dtype, t.shape});
    }
  }
  DSMOE_ASSIGN_OR_RETURN(auto writer, SafetensorsWriter::Create(
                                          (fs::path(out_dir) / "model.safetensors").string(), specs,
                                          {{"format", "pt"}, {"quantization", "dsmoe_q8_0"}}));
  std::vector<float> row;
  std::vector<int8_t> values;
  std::vector<uint16_t> scales;
  for (const std::string& name : names) {
    DSMOE_ASSIGN_OR_RETURN(TensorView t, ckpt->Tensor(name));
    report.bytes_in += static_cast<int64_t>(t.NumBytes());
    if (!IsQuantizedLinear(linear, name, t)) {
      DSMOE_RETURN_IF_ERROR(writer->Append(t.data, t.NumBytes()));
      report.bytes_out += static_cast<int64_t>(t.NumBytes());
      ++report.copied_tensors;
      continue;
    }
    const int64_t rows = t.shape[0], cols = t.shape[1];
    row.resize(cols);
    values.resize(static_cast<size_t>(rows * cols));
    scales.resize(static_cast<size_t>(rows * cols / kQ8Block));
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t k = 0; k < cols; ++k) row[k] = LoadAsF32(t.data, t.dtype, r * cols + k);
      QuantizeRowQ8(row.data(), cols, values.data() + r * cols,
                    scales.data() + r * (cols / kQ8Block));
    }
    DSMOE_RETURN_IF_ERROR(writer->Append(values.data(), values.size()));
    DSMOE_RETURN_IF_ERROR(writer->Append(scales.data(), scales.size() * sizeof(uint16_t)));
    report.bytes_out += static_cast<int64_t>(values.size() + scales.size() * sizeof(uint16_t));
    ++report.quantized_tensors;
  }
  DSMOE_RETURN_IF_ERROR(writer->Finish());

  nlohmann::ordered_json config = nlohmann::ordered_json::parse(config_text);
  config["quantization_config"] = {
      {"quant_method", "dsmoe_q8_0"}, {"block_size", kQ8Block}, {"bits", 8}};
  std::ofstream(fs::path(out_dir) / "config.json") << config.dump(2) << "\n";
  for (const char* extra : {"generation_config.json", "tokenizer.json", "tokenizer_config.json"}) {
    if (fs::exists(fs::path(in_dir) / extra)) {
      fs::copy_file(fs::path(in_dir) / extra, fs::path(out_dir) / extra,
                    fs::copy_options::overwrite_existing, ec);
      if (ec)
        return absl::PermissionDeniedError(absl::StrCat("copying ", extra, ": ", ec.message()));
    }
  }
  fs::remove(fs::path(out_dir) / "model.safetensors.index.json", ec);
  return report;
}

}  // namespace dsmoe
