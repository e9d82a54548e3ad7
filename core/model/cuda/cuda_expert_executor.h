// Routed experts on a GPU behind the RoutedExpertExecutor interface: what a GPU expert server
// runs, and what lets a CPU attention side use GPU experts. The hidden states and routing come
// from the host; all the selected experts of a call run as two grouped GEMM launches (gate/up
// with SiLU fused, then down) and the weighted combine happens on the device, so only [T, H]
// goes back.
//
// It computes no gate: the routing (experts and their weights, routed_scaling_factor included)
// comes from the caller's gate, so every config the CPU gate routes runs here unchanged.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <vector>

#include "core/model/cuda/device_weights.h"
#include "core/model/routed_experts.h"

namespace dsmoe::cuda {

// Thread-compatible; Run allocates nothing. Owns its device memory and stream.
class CudaExpertExecutor final : public RoutedExpertExecutor {
 public:
  // Uploads every routed expert `weights` holds (any WeightSelection) to `device` as bf16.
  // Nothing of `weights` is used afterwards: the host copy may be dropped (an expert server on
  // a GPU keeps only the device copy). `max_tokens` bounds T per call.
  static absl::StatusOr<std::unique_ptr<CudaExpertExecutor>> Create(const ModelWeights& weights,
                                                                    int device, int64_t max_tokens);
  ~CudaExpertExecutor() override;

  absl::Status Run(int64_t layer, const float* x, int64_t T, const int32_t* experts,
                   const float* weights, int64_t k, float* out) override;

  // As LocalExpertExecutor::RunAssignments (what an expert server computes): out[t] = Σ over
  // the assignments of token t, in their order, of weight · expert(x[t]); zeros for tokens
  // without any. At most max_tokens tokens and max_tokens × top-k assignments.
  absl::Status RunAssignments(int64_t layer, const float* x, int64_t T,
                              const ExpertAssignments& assignments, float* out);

  // How a computation's hidden states reach the device and its output leaves it, when not
  // through host memory (the NCCL transport receives and sends them GPU to GPU).
  struct DeviceIo {
    // Fills `x` ([T, H] fp32 on the device): enqueued on `stream`, or done before returning.
    std::function<absl::Status(float* x, cudaStream_t stream)> receive;
    // Takes `out` ([T, H] fp32 on the device), which is ready once `stream` reaches this point.
    std::function<absl::Status(const float* out, cudaStream_t stream)> send;
  };
  // RunAssignments with the input and output moved by `io`. The assignments are checked before
  // `io.receive` is called.
  absl::Status RunAssignments(int64_t layer, int64_t T, const ExpertAssignments& assignments,
                              const DeviceIo& io);

 private:
  // INVALID_ARGUMENT / FAILED_PRECONDITION unless layer is a MoE layer whose experts[0, n) are
  // all held here.
  absl::Status CheckExperts(int64_t layer, const int32_t* experts, int64_t n) const;

  explicit CudaExpertExecutor(const ModelConfig& config) : config_(config) {}

  const ModelConfig config_;
  int device_ = 0;
  int64_t max_tokens_ = 0, max_k_ = 0;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<DeviceWeights> dw_;
  void* arena_ = nullptr;
  float *x_ = nullptr, *route_w_ = nullptr, *expert_out_ = nullptr, *out_ = nullptr;
  uint16_t *x_bf16_ = nullptr, *act_ = nullptr;
  int32_t* route_e_ = nullptr;
  int32_t *route_t_ = nullptr, *token_offsets_ = nullptr;  // RunAssignments: tokens, CSR
  GroupedPlan plan_;
  // RunAssignments' host staging: assignments sorted by token (stable), and the CSR offsets.
  std::vector<int32_t> sorted_expert_, sorted_token_, offsets_;
  std::vector<float> sorted_weight_;
};

}  // namespace dsmoe::cuda
