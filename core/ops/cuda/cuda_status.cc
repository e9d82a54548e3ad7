#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::cuda {

absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), ": ", cudaGetErrorString(err)));
}

absl::Status CublasStatus(cublasStatus_t status, const char* what) {
  if (status == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", static_cast<int>(status)));
}

absl::Status CheckCudaDevice(int device) {
  int count = 0;
  // Without a driver this fails (cudaErrorInsufficientDriver) rather than reporting 0 devices.
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return absl::FailedPreconditionError(absl::StrCat("no CUDA device: ", cudaGetErrorString(err)));
  }
  if (count == 0)
    return absl::FailedPreconditionError("no CUDA device: the runtime sees 0 devices");
  if (device < 0 || device >= count) {
    return absl::FailedPreconditionError(
        absl::StrCat("no CUDA device ", device, ": the runtime sees ", count, " device(s)"));
  }
  return absl::OkStatus();
}

}  // namespace dsmoe::cuda
