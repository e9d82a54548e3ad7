// Facts about a model that follow from its config alone: parameter counts. Beside the config
// (not the checkpoint writer), so that whoever describes a model — `dsmoe info`, the gateway's
// GetModelInfo, benchmarks — needs nothing else.
#pragma once

#include <cstdint>

#include "core/model/config.h"

namespace dsmoe {

// Parameter counts: total, and active per token as the DeepSeekMoE paper counts them (all but
// the routed experts not chosen).
struct ParameterCount {
  int64_t total = 0;
  int64_t active = 0;
};
ParameterCount CountParameters(const ModelConfig& config);

}  // namespace dsmoe
