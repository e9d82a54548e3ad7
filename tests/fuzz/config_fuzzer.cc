// Fuzz target: config.json and generation_config.json parsing (core/model/config.h). An
// accepted config must be one the rest of dsmoe can size itself from: every derived count
// (MoE layers, context, parameters) computable without overflow or hanging.
#include <cstdint>
#include <string>

#include "core/model/config.h"
#include "core/model/model_facts.h"
#include "tests/fuzz/fuzz_check.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = dsmoe::ModelConfig::FromJson(text, "config.json");
  if (config.ok()) {
    DSMOE_FUZZ_CHECK(config->NumMoeLayers() >= 0 &&
                     config->NumMoeLayers() <= config->num_hidden_layers);
    DSMOE_FUZZ_CHECK(config->MaxContext() >= config->max_position_embeddings);
    DSMOE_FUZZ_CHECK(config->head_dim() > 0);
    const dsmoe::ParameterCount params = dsmoe::CountParameters(*config);
    DSMOE_FUZZ_CHECK(params.total > 0 && params.active > 0 && params.active <= params.total);
    auto generation = dsmoe::GenerationConfig::FromJson(text, "generation_config.json", *config);
    (void)generation;
  } else {
    DSMOE_FUZZ_CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
  }
  return 0;
}
