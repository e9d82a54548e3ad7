// Facts about a model that follow from its config alone: parameter counts, and the weights a
// decode step reads. Beside the config
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

// The weights one token's decode step (batch 1) reads: every projection but the routed experts
// the token does not choose, one row of the embedding, the whole head (the embedding matrix
// again when tied). Norms and biases (a few vectors) are left out. The roofline of a
// memory-bound decode step is these bytes over the memory bandwidth.
struct DecodeWeights {
  int64_t matrices = 0;  // attention, dense and shared MLPs, top-k routed experts, head, one row
  int64_t routers = 0;   // the MoE layers' gates (kept in fp32 on a GPU)
};
DecodeWeights CountDecodeWeights(const ModelConfig& config);

}  // namespace dsmoe
