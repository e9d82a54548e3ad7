// A model's weights on one GPU, uploaded once: every matrix as bf16 (F32 and F16 checkpoints are
// converted at upload), norms, biases and the router in fp32, all in one cudaMalloc.
//
// Layout choices made for the kernels: q/k/v are one [(nh + 2·nkv)·hd, H] matrix (one GEMM),
// each MLP's gate and up are one [2W, H] matrix (gate rows, then up rows), and every MoE layer
// has device tables of per-group pointers for the grouped expert GEMMs (groups 0..E-1 the routed
// experts, group E the shared expert when there is one).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "core/model/weights.h"
#include "core/ops/cuda/cuda_ops.h"
#include "core/util/status.h"

namespace dsmoe::cuda {

struct DeviceMlp {
  const uint16_t* gate_up = nullptr;  // [2W, H]
  const uint16_t* down = nullptr;     // [H, W]
  int64_t width = 0;                  // W
};

struct DeviceLayer {
  const float* input_norm = nullptr;           // [H]
  const float* post_attention_norm = nullptr;  // [H]
  const uint16_t* qkv = nullptr;               // [(nh + 2·nkv)·hd, H]
  const float* qkv_bias = nullptr;             // [(nh + 2·nkv)·hd] or null
  const uint16_t* o = nullptr;                 // [H, nh·hd]
  const float* o_bias = nullptr;               // [H] or null
  bool is_moe = false;
  DeviceMlp dense;                // dense layers
  const float* router = nullptr;  // MoE: [E, H] fp32
  bool has_shared = false;
  GroupedWeights groups;            // MoE: E routed (+ 1 shared) groups
  std::vector<bool> routed_loaded;  // [E]: which routed experts are on the device
};

// What to upload. An attention-side runner needs everything but may leave the routed experts to
// a RoutedExpertExecutor; an expert server needs only its routed experts.
struct DeviceWeightParts {
  bool attention_side = true;  // embeddings, norms, attention, dense MLPs, routers, shared, head
  bool routed_experts = true;  // every routed expert `weights` holds
};

// Const after Create; thread-safe to read. Owns the device memory (freed in the destructor).
class DeviceWeights {
 public:
  // REQUIRES: the current CUDA device is the target. The parts asked for must be loaded in
  // `weights` (except routed experts, which are uploaded where loaded).
  static absl::StatusOr<std::unique_ptr<DeviceWeights>> Create(const ModelWeights& weights,
                                                               const DeviceWeightParts& parts);
  ~DeviceWeights();
  DeviceWeights(const DeviceWeights&) = delete;
  DeviceWeights& operator=(const DeviceWeights&) = delete;

  const uint16_t* embed_tokens = nullptr;  // [V, H]
  const float* final_norm = nullptr;       // [H]
  const uint16_t* lm_head = nullptr;       // [V, H] (the embedding when tied)
  std::vector<DeviceLayer> layers;
  size_t num_bytes() const { return num_bytes_; }

 private:
  friend class DeviceWeightsBuilder;  // device_weights.cc: plans and uploads every piece
  DeviceWeights() = default;
  void* arena_ = nullptr;
  size_t num_bytes_ = 0;
};

}  // namespace dsmoe::cuda
