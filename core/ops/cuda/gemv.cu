// Dense projections of small batches (decode): y[T, N] (+)= x[T, K]·Wᵀ with a warp per output
// feature. cuBLAS's kernels for a handful of rows cost several microseconds of fixed time; here
// the warp streams its weight row with 16-byte loads (all independent, so the row is in flight
// at once) and dots it with up to 8 rows of x per pass.
#include "core/ops/cuda/cuda_ops.h"
#include "core/ops/cuda/kernel_util.cuh"

namespace dsmoe::cuda {

namespace {

constexpr int kWarps = 8;  // warps (output features) per block

// 8 consecutive values of a bf16 or fp32 row as fp32 (16-byte aligned).
__device__ __forceinline__ void Load8(const uint16_t* p, float (&f)[8]) {
  UnpackBf16x8(__ldg(reinterpret_cast<const uint4*>(p)), f);
}
__device__ __forceinline__ void Load8(const float* p, float (&f)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w;
  f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

// kRows: rows of x dotted with one read of the weight row, a compile-time bound chosen by the
// launcher (GemvRowsPerPass).
template <int kRows, class Weight, class Input>
__global__ void __launch_bounds__(kWarps * 32)
    GemvKernel(const Input* __restrict__ x, int64_t T, const Weight* __restrict__ w, int64_t N,
               int64_t K, bool accumulate, float* __restrict__ y) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (n >= N) return;
  const Weight* wr = w + n * K;
  for (int64_t r0 = 0; r0 < T; r0 += kRows) {
    const int rows = static_cast<int>(min(static_cast<int64_t>(kRows), T - r0));
    float acc[kRows] = {};
#pragma unroll 4
    for (int64_t c = lane * 8; c < K; c += 32 * 8) {
      float wf[8];
      Load8(wr + c, wf);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          float xf[8];
          Load8(x + (r0 + r) * K + c, xf);
#pragma unroll
          for (int d = 0; d < 8; ++d) acc[r] += wf[d] * xf[d];
        }
      }
    }
    // Warp sums; lane r writes row r.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      for (int o = 16; o > 0; o >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
      if (lane == r && r < rows) {
        float* out = y + (r0 + r) * N + n;
        *out = accumulate ? *out + acc[r] : acc[r];
      }
    }
  }
}

template <class Weight, class Input>
cudaError_t Launch(const Input* x, int64_t T, const Weight* w, int64_t N, int64_t K,
                   bool accumulate, float* y, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (K % 8 != 0) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>((N + kWarps - 1) / kWarps);
  constexpr unsigned kThreads = kWarps * 32;
  switch (GemvRowsPerPass(T)) {
    case 1:
      GemvKernel<1><<<blocks, kThreads, 0, stream>>>(x, T, w, N, K, accumulate, y);
      break;
    case 2:
      GemvKernel<2><<<blocks, kThreads, 0, stream>>>(x, T, w, N, K, accumulate, y);
      break;
    case 4:
      GemvKernel<4><<<blocks, kThreads, 0, stream>>>(x, T, w, N, K, accumulate, y);
      break;
    default:
      GemvKernel<8><<<blocks, kThreads, 0, stream>>>(x, T, w, N, K, accumulate, y);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchGemvBf16(const uint16_t* x_bf16, int64_t T, const uint16_t* w, int64_t N,
                           int64_t K, bool accumulate, float* y, cudaStream_t stream) {
  return Launch(x_bf16, T, w, N, K, accumulate, y, stream);
}

cudaError_t LaunchGemvF32(const float* x, int64_t T, const float* w, int64_t N, int64_t K, float* y,
                          cudaStream_t stream) {
  return Launch(x, T, w, N, K, false, y, stream);
}

}  // namespace dsmoe::cuda
