#include "core/ops/cuda/cublas_gemm.h"

#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::cuda {

absl::StatusOr<std::unique_ptr<CublasGemm>> CublasGemm::Create(size_t workspace_bytes) {
  auto gemm = std::unique_ptr<CublasGemm>(new CublasGemm());
  DSMOE_RETURN_IF_ERROR(CublasStatus(cublasCreate(&gemm->handle_), "cublasCreate"));
  DSMOE_CUDA_RETURN_IF_ERROR(cudaMalloc(&gemm->workspace_, workspace_bytes), "cuBLAS workspace");
  gemm->workspace_bytes_ = workspace_bytes;
  return gemm;
}

CublasGemm::~CublasGemm() {
  if (handle_ != nullptr) cublasDestroy(handle_);
  if (workspace_ != nullptr) cudaFree(workspace_);
}

absl::Status CublasGemm::Bind(cudaStream_t stream) {
  if (bound_ && stream == stream_) return absl::OkStatus();
  DSMOE_RETURN_IF_ERROR(CublasStatus(cublasSetStream(handle_, stream), "cublasSetStream"));
  // cublasSetStream resets the workspace to cuBLAS's own pool, which may allocate during graph
  // capture; point it back at ours.
  DSMOE_RETURN_IF_ERROR(CublasStatus(cublasSetWorkspace(handle_, workspace_, workspace_bytes_),
                                     "cublasSetWorkspace"));
  stream_ = stream;
  bound_ = true;
  return absl::OkStatus();
}

// Row-major y[T, N] = x[T, K]·Wᵀ is, in cuBLAS's column-major terms, yᵀ (N×T, ld N) =
// op(A)·B with A = W seen as K×N (ld K) transposed and B = xᵀ (K×T, ld K).
absl::Status CublasGemm::Bf16(const uint16_t* x, int64_t T, const uint16_t* w, int64_t N, int64_t K,
                              float beta, float* y, cudaStream_t stream) {
  if (T <= 0) return absl::OkStatus();
  DSMOE_RETURN_IF_ERROR(Bind(stream));
  const float alpha = 1.0f;
  return CublasStatus(
      cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(T),
                   static_cast<int>(K), &alpha, w, CUDA_R_16BF, static_cast<int>(K), x, CUDA_R_16BF,
                   static_cast<int>(K), &beta, y, CUDA_R_32F, static_cast<int>(N),
                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx (bf16)");
}

absl::Status CublasGemm::F32(const float* x, int64_t T, const float* w, int64_t N, int64_t K,
                             float* y, cudaStream_t stream) {
  if (T <= 0) return absl::OkStatus();
  DSMOE_RETURN_IF_ERROR(Bind(stream));
  const float alpha = 1.0f, beta = 0.0f;
  return CublasStatus(
      cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(T),
                   static_cast<int>(K), &alpha, w, CUDA_R_32F, static_cast<int>(K), x, CUDA_R_32F,
                   static_cast<int>(K), &beta, y, CUDA_R_32F, static_cast<int>(N),
                   CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT),
      "cublasGemmEx (fp32)");
}

}  // namespace dsmoe::cuda
