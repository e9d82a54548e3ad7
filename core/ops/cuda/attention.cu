// Causal attention over the paged KV cache, one block per (token, query head); decode and
// prefill use the same kernels: a token's mask is its own position, and the keys of earlier
// tokens of the same batch were written to the cache by LaunchRopeKvWrite before this launch.
//
// Head sizes 8·2^i (<= 256, the usual 64 and 128 among them) take the vector kernel: hd / 8 lanes
// share a position, each holding 8 dimensions of q, of the key and value rows (one 16-byte load
// each) and of the output, so a warp scores 32·8 / hd positions per step with a few shuffles, and
// kUnroll steps' loads are issued before any is used. Each lane group keeps its own online
// softmax (running max and sum, fp32); the groups, then the warps, are merged at the end. Other
// head sizes take the scalar kernel: a lane per position, the warp's 32 positions per chunk.
#include <cuda_bf16.h>

#include <cmath>

#include "core/ops/cuda/cuda_ops.h"
#include "core/ops/cuda/kernel_util.cuh"

namespace dsmoe::cuda {

namespace {

constexpr int kNumWarps = 4;
constexpr int kMaxDimsPerLane = 8;  // head_dim <= 256

// q (shared memory, already scaled) · key row of hd bf16 values.
__device__ __forceinline__ float DotKey(const float* q, const uint16_t* key, int hd) {
  float s = 0.0f;
  if (hd % 8 == 0) {  // rows are then 16-byte aligned: 8 values per load
    for (int d = 0; d < hd; d += 8) {
      const uint4 v = *reinterpret_cast<const uint4*>(key + d);
      const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        s += q[d + 2 * i] * Bf16BitsToFloat(static_cast<uint16_t>(words[i] & 0xffffu));
        s += q[d + 2 * i + 1] * Bf16BitsToFloat(static_cast<uint16_t>(words[i] >> 16));
      }
    }
  } else {
    for (int d = 0; d < hd; ++d) s += q[d] * Bf16BitsToFloat(key[d]);
  }
  return s;
}

// The scalar kernel (any even hd <= 256).
__global__ void __launch_bounds__(kNumWarps * 32)
    PagedAttentionKernel(const float* __restrict__ qkv, const int32_t* __restrict__ positions,
                         const int32_t* __restrict__ slots, int nh, int nkv, int hd, float scale,
                         PagedKvLayer kv, uint16_t* __restrict__ out) {
  __shared__ float warp_max[kNumWarps], warp_sum[kNumWarps];
  __shared__ float warp_acc[kNumWarps][kMaxDimsPerLane * 32];
  __shared__ float q_shared[kMaxDimsPerLane * 32];
  const int64_t t = blockIdx.x / nh;
  const int h = static_cast<int>(blockIdx.x % nh);
  const int kvh = h / (nh / nkv);  // HF repeat_kv
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int p_last = positions[t];
  const int kv_row = nkv * hd;
  const int32_t* pages = kv.page_table + static_cast<int64_t>(slots[t]) * kv.pages_per_slot;

  const float* q = qkv + t * static_cast<int64_t>((nh + 2 * nkv) * hd) + h * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) q_shared[d] = q[d] * scale;
  __syncthreads();
  float acc[kMaxDimsPerLane];
#pragma unroll
  for (int i = 0; i < kMaxDimsPerLane; ++i) acc[i] = 0.0f;
  float m = -INFINITY, l = 0.0f;
  for (int p0 = warp * 32; p0 <= p_last; p0 += kNumWarps * 32) {
    // This lane's position of the chunk: its score and the offset of its cache row.
    const int p = p0 + lane;
    const bool valid = p <= p_last;
    int64_t base = 0;
    float s = -INFINITY;
    if (valid) {
      base = (static_cast<int64_t>(pages[p / kv.page_size]) * kv.page_size + p % kv.page_size) *
                 kv_row +
             kvh * hd;
      s = DotKey(q_shared, kv.keys + base, hd);
    }
    float chunk_max = s;
    for (int o = 16; o > 0; o >>= 1) {
      chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, o));
    }
    const float m_new = fmaxf(m, chunk_max);         // finite: position p0 is valid
    const float correction = expf(m - m_new);        // 0 on the first chunk (m = -inf)
    const float e = valid ? expf(s - m_new) : 0.0f;  // this lane's position's weight
    float e_sum = e;
    for (int o = 16; o > 0; o >>= 1) e_sum += __shfl_xor_sync(0xffffffffu, e_sum, o);
    l = l * correction + e_sum;
#pragma unroll
    for (int i = 0; i < kMaxDimsPerLane; ++i) acc[i] *= correction;
    const int count = min(32, p_last - p0 + 1);
#pragma unroll 8
    for (int j = 0; j < count; ++j) {
      const float ej = __shfl_sync(0xffffffffu, e, j);
      const int64_t bj = __shfl_sync(0xffffffffu, base, j);
#pragma unroll
      for (int i = 0; i < kMaxDimsPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < hd) acc[i] += ej * Bf16BitsToFloat(kv.values[bj + d]);
      }
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
    // A warp that saw no chunk (p_last < 32·w) has m = -inf and contributes nothing.
    factor[w] = warp_max[w] == -INFINITY ? 0.0f : expf(warp_max[w] - max_all);
    sum_all += warp_sum[w] * factor[w];
  }
  const float inv = 1.0f / sum_all;
  uint16_t* o = out + (t * nh + h) * hd;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float v = 0.0f;
    for (int w = 0; w < kNumWarps; ++w) v += warp_acc[w][d] * factor[w];
    o[d] = ToBf16Bits(v * inv);
  }
}

// Folds the online-softmax state (mo, lo, acco) of other positions into (m, l, acc).
__device__ __forceinline__ void MergeSoftmax(float& m, float& l, float (&acc)[8], float mo,
                                             float lo, const float (&acco)[8]) {
  const float m_new = fmaxf(m, mo);
  if (m_new == -INFINITY) return;  // neither side saw a position
  const float fa = m == -INFINITY ? 0.0f : expf(m - m_new);
  const float fb = mo == -INFINITY ? 0.0f : expf(mo - m_new);
  l = l * fa + lo * fb;
#pragma unroll
  for (int i = 0; i < 8; ++i) acc[i] = acc[i] * fa + acco[i] * fb;
  m = m_new;
}

template <int kGroup>  // lanes per position: hd / 8
__global__ void __launch_bounds__(kNumWarps * 32)
    PagedAttentionVecKernel(const float* __restrict__ qkv, const int32_t* __restrict__ positions,
                            const int32_t* __restrict__ slots, int nh, int nkv, float scale,
                            PagedKvLayer kv, uint16_t* __restrict__ out) {
  constexpr int hd = kGroup * 8;
  constexpr int kPositionsPerWarp = 32 / kGroup;
  constexpr int kStride = kNumWarps * kPositionsPerWarp;  // positions per step of the block
  constexpr int kUnroll = 4;
  __shared__ float warp_max[kNumWarps], warp_sum[kNumWarps];
  __shared__ float warp_acc[kNumWarps][hd];
  const int64_t t = blockIdx.x / nh;
  const int h = static_cast<int>(blockIdx.x % nh);
  const int kvh = h / (nh / nkv);  // HF repeat_kv
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int slice = lane % kGroup;  // this lane's dimensions: [8·slice, 8·slice + 8)
  const int sub = lane / kGroup;    // this lane group's position within a warp step
  const int p_last = positions[t];
  const int64_t kv_row = static_cast<int64_t>(nkv) * hd;
  const int32_t* pages = kv.page_table + static_cast<int64_t>(slots[t]) * kv.pages_per_slot;

  const float* q = qkv + t * static_cast<int64_t>((nh + 2 * nkv) * hd) + h * hd + 8 * slice;
  float qf[8], acc[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    qf[i] = q[i] * scale;
    acc[i] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  // The loop bound is the same for every lane (shuffles below need the whole warp).
  for (int p0 = warp * kPositionsPerWarp; p0 <= p_last; p0 += kStride * kUnroll) {
    uint4 key[kUnroll] = {}, value[kUnroll] = {};
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int p = p0 + u * kStride + sub;
      if (p <= p_last) {
        const int64_t base =
            (static_cast<int64_t>(pages[p / kv.page_size]) * kv.page_size + p % kv.page_size) *
                kv_row +
            kvh * hd + 8 * slice;
        key[u] = *reinterpret_cast<const uint4*>(kv.keys + base);
        value[u] = *reinterpret_cast<const uint4*>(kv.values + base);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const bool valid = p0 + u * kStride + sub <= p_last;
      float kf[8];
      UnpackBf16x8(key[u], kf);
      float s = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) s += qf[i] * kf[i];
#pragma unroll
      for (int o = kGroup / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (!valid) continue;
      float vf[8];
      UnpackBf16x8(value[u], vf);
      const float m_new = fmaxf(m, s);
      const float correction = expf(m - m_new);  // 0 on the first position (m = -inf)
      const float e = expf(s - m_new);
      l = l * correction + e;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] = acc[i] * correction + e * vf[i];
      m = m_new;
    }
  }
  // Lane groups of the warp (same slice, other positions), then the warps.
#pragma unroll
  for (int o = kGroup; o < 32; o <<= 1) {
    float acco[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acco[i] = __shfl_xor_sync(0xffffffffu, acc[i], o);
    const float mo = __shfl_xor_sync(0xffffffffu, m, o);
    const float lo = __shfl_xor_sync(0xffffffffu, l, o);
    MergeSoftmax(m, l, acc, mo, lo, acco);
  }
  if (sub == 0) {
    if (slice == 0) {
      warp_max[warp] = m;
      warp_sum[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) warp_acc[warp][8 * slice + i] = acc[i];
  }
  __syncthreads();
  if (warp != 0 || sub != 0) return;
  for (int w = 1; w < kNumWarps; ++w) {
    float acco[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acco[i] = warp_acc[w][8 * slice + i];
    MergeSoftmax(m, l, acc, warp_max[w], warp_sum[w], acco);
  }
  const float inv = 1.0f / l;
  uint16_t* o = out + (t * nh + h) * hd + 8 * slice;
#pragma unroll
  for (int i = 0; i < 8; ++i) o[i] = ToBf16Bits(acc[i] * inv);
}

}  // namespace

cudaError_t LaunchPagedAttention(const float* qkv, const int32_t* positions, const int32_t* slots,
                                 int64_t T, int nh, int nkv, int hd, float scale, PagedKvLayer kv,
                                 uint16_t* out_bf16, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (hd > kMaxDimsPerLane * 32 || nkv <= 0 || nh % nkv != 0) return cudaErrorInvalidValue;
  const unsigned blocks = static_cast<unsigned>(T * nh);
  constexpr unsigned kThreads = kNumWarps * 32;
  switch (hd) {
    case 8:
      PagedAttentionVecKernel<1>
          <<<blocks, kThreads, 0, stream>>>(qkv, positions, slots, nh, nkv, scale, kv, out_bf16);
      break;
    case 16:
      PagedAttentionVecKernel<2>
          <<<blocks, kThreads, 0, stream>>>(qkv, positions, slots, nh, nkv, scale, kv, out_bf16);
      break;
    case 32:
      PagedAttentionVecKernel<4>
          <<<blocks, kThreads, 0, stream>>>(qkv, positions, slots, nh, nkv, scale, kv, out_bf16);
      break;
    case 64:
      PagedAttentionVecKernel<8>
          <<<blocks, kThreads, 0, stream>>>(qkv, positions, slots, nh, nkv, scale, kv, out_bf16);
      break;
    case 128:
      PagedAttentionVecKernel<16>
          <<<blocks, kThreads, 0, stream>>>(qkv, positions, slots, nh, nkv, scale, kv, out_bf16);
      break;
    case 256:
      PagedAttentionVecKernel<32>
          <<<blocks, kThreads, 0, stream>>>(qkv, positions, slots, nh, nkv, scale, kv, out_bf16);
      break;
    default:
      PagedAttentionKernel<<<blocks, kThreads, 0, stream>>>(qkv, positions, slots, nh, nkv, hd,
                                                            scale, kv, out_bf16);
  }
  return cudaGetLastError();
}

}  // namespace dsmoe::cuda
