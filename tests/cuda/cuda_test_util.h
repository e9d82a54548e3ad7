// Helpers for the GPU tests: skipping without a GPU, device buffers, error measures.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "core/ops/cuda/cuda_status.h"

namespace dsmoe::testing {

// Empty when GPU 0 is usable, else why not.
inline std::string NoGpuReason() {
  const absl::Status s = cuda::CheckCudaDevice(0);
  return s.ok() ? std::string() : std::string(s.message());
}

#define DSMOE_SKIP_WITHOUT_GPU()                                          \
  do {                                                                    \
    const std::string why = ::dsmoe::testing::NoGpuReason();              \
    if (!why.empty()) GTEST_SKIP() << "needs a CUDA GPU (" << why << ")"; \
  } while (0)

#define ASSERT_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(expr)

// A device copy of a host vector; Download() reads it back.
template <class T>
class DeviceVector {
 public:
  explicit DeviceVector(size_t n) : n_(n) {
    EXPECT_EQ(cudaMalloc(&p_, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
  }
  explicit DeviceVector(const std::vector<T>& v) : DeviceVector(v.size()) { Upload(v); }
  ~DeviceVector() { cudaFree(p_); }
  DeviceVector(const DeviceVector&) = delete;
  DeviceVector& operator=(const DeviceVector&) = delete;
  void Upload(const std::vector<T>& v) {
    EXPECT_EQ(cudaMemcpy(p_, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
  }
  // Fills with a byte pattern, so unwritten outputs show up (0xff bytes: NaN for floats).
  void Poison() { EXPECT_EQ(cudaMemset(p_, 0xff, n_ * sizeof(T)), cudaSuccess); }
  std::vector<T> Download() const {
    std::vector<T> v(n_);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(cudaMemcpy(v.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
    return v;
  }
  T* get() { return p_; }
  size_t size() const { return n_; }

 private:
  T* p_ = nullptr;
  size_t n_;
};

// ‖a − b‖ / ‖b‖ in double; NaN anywhere gives +inf.
inline double RelErr(const float* a, const float* b, size_t n) {
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    if (std::isnan(a[i]) || std::isnan(b[i])) return INFINITY;
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}
inline double RelErr(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  return RelErr(a.data(), b.data(), std::min(a.size(), b.size()));
}

}  // namespace dsmoe::testing
