// CUDA and cuBLAS errors as absl::Status, for the host code of the CUDA backend.
#pragma once

#include <cublas_api.h>
#include <cuda_runtime_api.h>

#include <string>

#include "core/util/status.h"

namespace dsmoe::cuda {

// OK for cudaSuccess; otherwise INTERNAL "<what>: <cuda error name>: <string>".
absl::Status CudaStatus(cudaError_t err, const char* what);
absl::Status CublasStatus(cublasStatus_t status, const char* what);

// OK iff a CUDA device can be used; otherwise FAILED_PRECONDITION "no CUDA device: <why>"
// (the runtime's own error string: no driver, no device, ...). Never crashes on machines
// without a GPU or a driver.
absl::Status CheckCudaDevice(int device);

}  // namespace dsmoe::cuda

#define DSMOE_CUDA_RETURN_IF_ERROR(expr, what) \
  DSMOE_RETURN_IF_ERROR(::dsmoe::cuda::CudaStatus((expr), (what)))
