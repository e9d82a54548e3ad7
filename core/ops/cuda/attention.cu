// Causal attention over the paged KV cache, one block per (token, query head): each of its warps
// runs an online softmax (running max and sum, fp32) over every kNumWarps-th position of
// [0, p], and the warps' partial results are merged at the end. Decode and prefill use the
// same kernel: a token's mask is its own position, and the keys of earlier tokens of the same
// batch were written to the cache by LaunchRopeKvWrite before this launch.
#include <cuda_bf16.h>

#include <cmath>

#include "core/ops/cuda/cuda_ops.h"

namespace dsmoe::cuda {

namespace {

constexpr int kNumWarps = 4;
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256

__device__ __forceinline__ float Bf16BitsToFloat(uint16_t b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}

__global__ void __launch_bounds__(kNumWarps * 32)
    PagedAttentionKernel(const float* __restrict__ qkv, const int32_t* __restrict__ positions,
                         const int32_t* __restrict__ slots, int nh, int nkv, int hd, float scale,
                         PagedKvLayer kv, uint16_t* __restrict__ out) {
  __shared__ float warp_max[kNumWarps], warp_sum[kNumWarps];
  __shared__ float warp_acc[kNumWarps][kMaxDimsPerLane * 32];
  const int64_t t = blockIdx.x / nh;
  const int h = static_cast<int>(blockIdx.x % nh);
  const int kvh = h / (nh / nkv);  // HF repeat_kv
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int p_last = positions[t];
  const int kv_row = nkv * hd;
  const int32_t* pages = kv.page_table + static_cast<int64_t>(slots[t]) * kv.pages_per_slot;

  const float* q = qkv + t * static_cast<int64_t>((nh + 2 * nkv) * hd) + h * hd;
  float qr[kMaxDimsPerLane], acc[kMaxDimsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    qr[i] = d < hd ? q[d] * scale : 0.0f;
    acc[i] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (int p = warp; p <= p_last; p += kNumWarps) {
    const int64_t base =
        (static_cast<int64_t>(pages[p / kv.page_size]) * kv.page_size + p % kv.page_size) * kv_row +
        kvh * hd;
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) s += qr[i] * Bf16BitsToFloat(kv.keys[base + d]);
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    const float m_new = fmaxf(m, s);
    const float correction = expf(m - m_new);  // 0 on the first position (m = -inf)
    const float e = expf(s - m_new);
    l = l * correction + e;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) {
      const int d = lane + 32 * i;
      if (d < hd) acc[i] = acc[i] * correction + e * Bf16BitsToFloat(kv.values[base + d]);
    }
    m = m_new;
  }
  if (lane == 0) {
    warp_max[warp] = m;
    warp_sum[warp] = l;
  }
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) {
    const int d = lane + 32 * i;
    if (d < hd) warp_acc[warp][d] = acc[i];
  }
  __syncthreads();
  float max_all = -INFINITY;
  for (int w = 0; w < kNumWarps; ++w) max_all = fmaxf(max_all, warp_max[w]);
  float sum_all = 0.0f;
  float factor[kNumWarps];
  for (int w = 0; w < kNumWarps; ++w) {
    // A warp that saw no position (p_last < w) has m = -inf and contributes nothing.
    factor[w] = warp_max[w] == -INFINITY ? 0.0f : expf(warp_max[w] - max_all);
    sum_all += warp_sum[w] * factor[w];
  }
  const float inv = 1.0f / sum_all;
  uint16_t* o = out + (t * nh + h) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float v = 0.0f;
    for (int w = 0; w < kNumWarps; ++w) v += warp_acc[w][d] * factor[w];
    o[d] = __bfloat16_as_ushort(__float2bfloat16_rn(v * inv));
  }
}

}  // namespace

cudaError_t LaunchPagedAttention(const float* qkv, const int32_t* positions, const int32_t* slots,
                                 int64_t T, int nh, int nkv, int hd, float scale, PagedKvLayer kv,
                                 uint16_t* out_bf16, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (hd > kMaxDimsPerLane * 32 || nkv <= 0 || nh % nkv != 0) return cudaErrorInvalidValue;
  PagedAttentionKernel<<<static_cast<unsigned>(T * nh), kNumWarps * 32, 0, stream>>>(
      qkv, positions, slots, nh, nkv, hd, scale, kv, out_bf16);
  return cudaGetLastError();
}

}  // namespace dsmoe::cuda
