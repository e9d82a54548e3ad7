// Helpers for the GPU tests: skipping without a GPU, device buffers, error measures, random
// checkpoints and routings.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/model/make_model.h"
#include "core/model/sampler.h"
#include "core/model/weights.h"
#include "core/ops/cuda/cuda_status.h"
#include "tests/test_util.h"

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

// A random checkpoint of `preset` written into `dir`, loaded whole.
inline std::unique_ptr<ModelWeights> WriteAndLoad(const TempDir& dir, const std::string& preset,
                                                  DType dtype, uint64_t seed = 11) {
  const absl::Status s = WriteRandomCheckpoint(*PresetConfig(preset), {dtype, seed, 1}, dir.path());
  EXPECT_TRUE(s.ok()) << s;
  auto w = ModelWeights::Load(dir.path());
  EXPECT_TRUE(w.ok()) << w.status();
  return std::move(*w);
}

// How two [rows, V] logit arrays agree.
struct Agreement {
  double rel_err = 0;  // relative L2 of all logits
  double top1 = 0;     // fraction of rows whose argmax agrees
};
inline Agreement Compare(const std::vector<float>& got, const std::vector<float>& want, int64_t V) {
  Agreement a;
  a.rel_err = RelErr(got, want);
  const int64_t rows = static_cast<int64_t>(want.size()) / V;
  int64_t same = 0;
  for (int64_t r = 0; r < rows; ++r)
    same += ArgMax(got.data() + r * V, V) == ArgMax(want.data() + r * V, V);
  a.top1 = static_cast<double>(same) / static_cast<double>(rows);
  return a;
}

// A random routing of T tokens: k distinct experts of E each, weights uniform in
// [min_weight, 1).
struct Routing {
  std::vector<int32_t> experts;  // [T, k]
  std::vector<float> weights;    // [T, k]
};
inline Routing RandomRouting(int64_t T, int64_t E, int64_t k, unsigned seed, float min_weight) {
  Routing r{std::vector<int32_t>(T * k), std::vector<float>(T * k)};
  std::mt19937 rng(seed);
  std::vector<int32_t> perm(E);
  for (int64_t t = 0; t < T; ++t) {
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int64_t j = 0; j < k; ++j) {
      r.experts[t * k + j] = perm[j];
      r.weights[t * k + j] = std::uniform_real_distribution<float>(min_weight, 1.0f)(rng);
    }
  }
  return r;
}

}  // namespace dsmoe::testing
