// Routed experts on a GPU behind the RoutedExpertExecutor interface: what a GPU expert server
// runs, and what lets a CPU attention side use GPU experts. The hidden states and routing come
// from the host; all the selected experts of a call run as two grouped GEMM launches (gate/up
// with SiLU fused, then down) and the weighted combine happens on the device, so only [T, H]
// goes back.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "core/model/cuda/device_weights.h"
#include "core/model/routed_experts.h"

namespace dsmoe::cuda {

// Thread-compatible; Run allocates nothing. Owns its device memory and stream.
class CudaExpertExecutor final : public RoutedExpertExecutor {
 public:
  // Uploads every routed expert `weights` holds (any WeightSelection) to `device` as bf16.
  // REQUIRES: `weights` outlives this. `max_tokens` bounds T per call.
  static absl::StatusOr<std::unique_ptr<CudaExpertExecutor>> Create(const ModelWeights& weights,
                                                                    int device, int64_t max_tokens);
  ~CudaExpertExecutor() override;

  absl::Status Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                   const float* weights, int64_t k, float* out) override;

 private:
  explicit CudaExpertExecutor(const ModelWeights& weights) : weights_(weights) {}

  const ModelWeights& weights_;
  int device_ = 0;
  int64_t max_tokens_ = 0, max_k_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<DeviceWeights> dw_;
  void* arena_ = nullptr;
  float *x_ = nullptr, *route_w_ = nullptr, *expert_out_ = nullptr, *out_ = nullptr;
  uint16_t *x_bf16_ = nullptr, *act_ = nullptr;
  int32_t* route_e_ = nullptr;
  GroupedPlan plan_;
};

}  // namespace dsmoe::cuda
