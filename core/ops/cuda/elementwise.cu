// Per-row and element-wise kernels: RMSNorm, embedding gather, SiLU-mul, residual and bias adds,
// RoPE with the KV-cache write. All memory-bound: one pass over their inputs.
#include <cuda_bf16.h>

#include "core/ops/cuda/cuda_ops.h"
#include "core/ops/cuda/kernel_util.cuh"

namespace dsmoe::cuda {

namespace {

inline unsigned Blocks(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// Sum over the block; `shared` holds 32 floats. All threads get the result.
__device__ float BlockSum(float v, float* shared) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int num_warps = (blockDim.x + 31) / 32;
  v = lane < num_warps ? shared[lane] : 0.0f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// One block per row. The sum of squares in fp32 as HF (x.float().pow(2).mean()).
__global__ void RmsNormKernel(const float* __restrict__ x, const float* __restrict__ weight,
                              const int32_t* __restrict__ rows, int64_t H, float eps,
                              uint16_t* __restrict__ out_bf16, float* __restrict__ out_f32) {
  __shared__ float shared[32];
  const int64_t t = blockIdx.x;
  const int64_t r = rows != nullptr ? rows[t] : t;
  const float* xr = x + r * H;
  float sum = 0.0f;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) sum += xr[i] * xr[i];
  sum = BlockSum(sum, shared);
  const float scale = rsqrtf(sum / static_cast<float>(H) + eps);
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    const float v = weight[i] * (xr[i] * scale);
    out_bf16[t * H + i] = ToBf16Bits(v);
    if (out_f32 != nullptr) out_f32[t * H + i] = v;
  }
}

__global__ void EmbedKernel(const uint16_t* __restrict__ table, const int32_t* __restrict__ ids,
                            int64_t H, float* __restrict__ h) {
  const int64_t t = blockIdx.x;
  const uint16_t* row = table + static_cast<int64_t>(ids[t]) * H;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) h[t * H + i] = Bf16BitsToFloat(row[i]);
}

__global__ void SiluMulKernel(const float* __restrict__ gu, int64_t T, int64_t W,
                              uint16_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= T * W) return;
  const int64_t t = i / W, c = i % W;
  const float g = gu[t * 2 * W + c], u = gu[t * 2 * W + W + c];
  out[i] = ToBf16Bits(g / (1.0f + expf(-g)) * u);
}

__global__ void AddInPlaceKernel(const float* __restrict__ x, float* __restrict__ y, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += x[i];
}

__global__ void AddBiasKernel(const float* __restrict__ bias, int64_t n, int64_t N,
                              float* __restrict__ y) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) y[i] += bias[i % N];
}

__global__ void F32ToBf16Kernel(const float* __restrict__ x, int64_t n,
                                uint16_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = ToBf16Bits(x[i]);
}

// One block per token; threads walk (head, pair) for the rotated q and k heads, then the k and v
// rows are copied to the cache. Bias first, as HF adds it inside the projection.
__global__ void RopeKvWriteKernel(float* __restrict__ qkv, const float* __restrict__ bias,
                                  const int32_t* __restrict__ positions,
                                  const int32_t* __restrict__ slots, const float* __restrict__ cos,
                                  const float* __restrict__ sin, int nh, int nkv, int hd,
                                  PagedKvLayer kv) {
  const int64_t t = blockIdx.x;
  const int width = (nh + 2 * nkv) * hd;
  float* row = qkv + t * width;
  if (bias != nullptr) {
    for (int i = threadIdx.x; i < width; i += blockDim.x) row[i] += bias[i];
    __syncthreads();
  }
  const int half = hd / 2;
  const int p = positions[t];
  const float* c = cos + static_cast<int64_t>(p) * half;
  const float* s = sin + static_cast<int64_t>(p) * half;
  for (int i = threadIdx.x; i < (nh + nkv) * half; i += blockDim.x) {
    const int head = i / half, j = i % half;
    float* v = row + head * hd;
    const float a = v[j], b = v[j + half];
    v[j] = a * c[j] - b * s[j];
    v[j + half] = b * c[j] + a * s[j];
  }
  __syncthreads();
  const int kv_row = nkv * hd;
  const int32_t page =
      kv.page_table[static_cast<int64_t>(slots[t]) * kv.pages_per_slot + p / kv.page_size];
  const int64_t dst = (static_cast<int64_t>(page) * kv.page_size + p % kv.page_size) * kv_row;
  for (int i = threadIdx.x; i < kv_row; i += blockDim.x) {
    kv.keys[dst + i] = ToBf16Bits(row[nh * hd + i]);
    kv.values[dst + i] = ToBf16Bits(row[(nh + nkv) * hd + i]);
  }
}

}  // namespace

cudaError_t LaunchRmsNorm(const float* x, const float* weight, const int32_t* rows, int64_t T,
                          int64_t H, float eps, uint16_t* out_bf16, float* out_f32,
                          cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  const int threads = H >= 1024 ? 512 : H >= 256 ? 256 : 128;
  RmsNormKernel<<<static_cast<unsigned>(T), threads, 0, stream>>>(x, weight, rows, H, eps, out_bf16,
                                                                  out_f32);
  return cudaGetLastError();
}

cudaError_t LaunchEmbed(const uint16_t* table, const int32_t* ids, int64_t T, int64_t H, float* h,
                        cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  EmbedKernel<<<static_cast<unsigned>(T), 256, 0, stream>>>(table, ids, H, h);
  return cudaGetLastError();
}

cudaError_t LaunchSiluMul(const float* gate_up, int64_t T, int64_t W, uint16_t* out_bf16,
                          cudaStream_t stream) {
  if (T * W <= 0) return cudaSuccess;
  SiluMulKernel<<<Blocks(T * W, 256), 256, 0, stream>>>(gate_up, T, W, out_bf16);
  return cudaGetLastError();
}

cudaError_t LaunchAddInPlace(const float* x, float* y, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  AddInPlaceKernel<<<Blocks(n, 256), 256, 0, stream>>>(x, y, n);
  return cudaGetLastError();
}

cudaError_t LaunchAddBias(const float* bias, int64_t T, int64_t N, float* y, cudaStream_t stream) {
  if (T * N <= 0) return cudaSuccess;
  AddBiasKernel<<<Blocks(T * N, 256), 256, 0, stream>>>(bias, T * N, N, y);
  return cudaGetLastError();
}

cudaError_t LaunchF32ToBf16(const float* x, int64_t n, uint16_t* out, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  F32ToBf16Kernel<<<Blocks(n, 256), 256, 0, stream>>>(x, n, out);
  return cudaGetLastError();
}

cudaError_t LaunchRopeKvWrite(float* qkv, const float* bias, const int32_t* positions,
                              const int32_t* slots, const float* cos, const float* sin, int64_t T,
                              int nh, int nkv, int hd, PagedKvLayer kv, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  RopeKvWriteKernel<<<static_cast<unsigned>(T), 256, 0, stream>>>(qkv, bias, positions, slots, cos,
                                                                  sin, nh, nkv, hd, kv);
  return cudaGetLastError();
}

}  // namespace dsmoe::cuda
