// The projections on the GPU: cuBLAS GEMMs with bf16 weights and activations, fp32 accumulation
// and fp32 output, so residual adds can be folded in as beta = 1 (h += x·Woᵀ in one call).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>

#include "core/util/status.h"

namespace dsmoe::cuda {

// Owns a cuBLAS handle and its workspace (preallocated, so calls can be captured in a CUDA
// graph). Thread-compatible: one owner enqueues; each call names its stream.
class CublasGemm {
 public:
  // REQUIRES: the current CUDA device is the one the GEMMs will run on.
  static absl::StatusOr<std::unique_ptr<CublasGemm>> Create(size_t workspace_bytes = 32u << 20);
  ~CublasGemm();
  CublasGemm(const CublasGemm&) = delete;
  CublasGemm& operator=(const CublasGemm&) = delete;

  // y[T, N] = x[T, K] · W[N, K]ᵀ + beta · y[T, N]. x and W bf16 (row-major, W as the
  // checkpoint stores it), y fp32, fp32 accumulation. beta is 0 or 1 (1: accumulate into y).
  absl::Status Bf16(const uint16_t* x, int64_t T, const uint16_t* w, int64_t N, int64_t K,
                    float beta, float* y, cudaStream_t stream);

  // y[T, N] = x[T, K] · W[N, K]ᵀ in plain fp32 (no TF32): the router, whose top-k must match the
  // CPU engine's.
  absl::Status F32(const float* x, int64_t T, const float* w, int64_t N, int64_t K, float* y,
                   cudaStream_t stream);

 private:
  CublasGemm() = default;
  absl::Status Bind(cudaStream_t stream);

  cublasHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  cudaStream_t stream_ = nullptr;
  bool bound_ = false;
};

}  // namespace dsmoe::cuda
