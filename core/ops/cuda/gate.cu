// The MoE gate on the GPU (softmax + top-k, as core/model/gate.cc), the grouping of a batch's
// (token, expert) assignments into per-expert row ranges that the grouped GEMMs consume, and the
// weighted combine of the experts' outputs. All data-dependent decisions stay on the device, so
// a whole MoE layer can be replayed from a CUDA graph without a host round trip.
#include <algorithm>
#include <cmath>

#include "core/ops/cuda/cuda_ops.h"

namespace dsmoe::cuda {

namespace {

constexpr int kMaxExpertsPerLane = 8;  // E <= 256

// Softmax + top-k of token t by one warp (every lane calls it).
__device__ void GateTopKWarp(const float* __restrict__ logits, int64_t t, int E, int k,
                             bool norm_topk_prob, int32_t* __restrict__ experts,
                             float* __restrict__ weights) {
  const int lane = threadIdx.x % 32;
  const float* l = logits + t * E;
  float v[kMaxExpertsPerLane];
  float max = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < E ? l[e] : -INFINITY;
    max = fmaxf(max, v[i]);
  }
  for (int o = 16; o > 0; o >>= 1) max = fmaxf(max, __shfl_xor_sync(0xffffffffu, max, o));
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    const int e = lane + 32 * i;
    v[i] = e < E ? expf(v[i] - max) : -1.0f;  // -1: not an expert (never chosen)
    if (e < E) sum += v[i];
  }
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const float inv = 1.0f / sum;
#pragma unroll
  for (int i = 0; i < kMaxExpertsPerLane; ++i) {
    if (v[i] >= 0.0f) v[i] *= inv;
  }
  // Repeated arg-max, ties to the lower index, exactly as RouteTokens.
  float chosen_sum = 0.0f;
  for (int j = 0; j < k; ++j) {
    float best = -1.0f;
    int best_e = 0x7fffffff;
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) {
      const int e = lane + 32 * i;
      if (v[i] >= 0.0f && (v[i] > best || (v[i] == best && e < best_e))) {
        best = v[i];
        best_e = e;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
      if (ob > best || (ob == best && oe < best_e)) {
        best = ob;
        best_e = oe;
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxExpertsPerLane; ++i) {
      if (lane + 32 * i == best_e) v[i] = -1.0f;  // taken
    }
    chosen_sum += best;
    if (lane == 0) {
      experts[t * k + j] = best_e;
      weights[t * k + j] = best;
    }
  }
  if (norm_topk_prob && k > 1) {
    __syncwarp();
    const float denom = chosen_sum + 1e-20f;
    for (int j = lane; j < k; j += 32) weights[t * k + j] /= denom;
  }
}

// One warp per token.
__global__ void GateTopKKernel(const float* __restrict__ logits, int64_t T, int E, int k,
                               bool norm_topk_prob, int32_t* __restrict__ experts,
                               float* __restrict__ weights) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t < T) GateTopKWarp(logits, t, E, k, norm_topk_prob, experts, weights);
}

constexpr int kMaxGroups = 1024;

// By the whole block: counting sort of the A assignments by expert, then the tile list.
// Assignment a reads token tokens[a], or a / k without a token list (k per token, in order).
__device__ void BuildGroupedPlanBlock(const int32_t* __restrict__ experts,
                                      const int32_t* __restrict__ tokens, int64_t A, int k,
                                      int64_t T, int E, bool shared, GroupedPlan plan) {
  __shared__ int counts[kMaxGroups];
  __shared__ int cursor[kMaxGroups];
  const int G = E + (shared ? 1 : 0);
  for (int g = threadIdx.x; g < G; g += blockDim.x) counts[g] = 0;
  __syncthreads();
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) atomicAdd(&counts[experts[a]], 1);
  if (shared && threadIdx.x == 0) counts[E] = static_cast<int>(T);
  __syncthreads();
  if (threadIdx.x == 0) {
    int offset = 0, tiles = 0;
    for (int g = 0; g < G; ++g) {
      plan.group_offset[g] = offset;
      cursor[g] = offset;
      for (int r = 0; r < counts[g]; r += kGroupedTileRows) {
        plan.tile_group[tiles] = g;
        plan.tile_row[tiles] = offset + r;
        ++tiles;
      }
      offset += counts[g];
    }
    plan.group_offset[G] = offset;
    *plan.num_tiles = tiles;
  }
  __syncthreads();
  // Row order inside a group does not matter: each grouped row is computed on its own.
  for (int64_t a = threadIdx.x; a < A; a += blockDim.x) {
    const int row = atomicAdd(&cursor[experts[a]], 1);
    plan.row_token[row] = tokens != nullptr ? tokens[a] : static_cast<int32_t>(a / k);
    plan.assign_row[a] = row;
  }
  if (shared) {
    for (int64_t t = threadIdx.x; t < T; t += blockDim.x) {
      plan.row_token[cursor[E] + t] = static_cast<int32_t>(t);
    }
  }
}

__global__ void BuildGroupedPlanKernel(const int32_t* __restrict__ experts,
                                       const int32_t* __restrict__ tokens, int64_t A, int k,
                                       int64_t T, int E, bool shared, GroupedPlan plan) {
  BuildGroupedPlanBlock(experts, tokens, A, k, T, E, shared, plan);
}

// Both in one block (a decode step's layer saves a launch): the warps route the tokens in turn,
// then the block groups them.
__global__ void RouteAndPlanKernel(const float* __restrict__ logits, int64_t T, int E, int k,
                                   bool norm_topk_prob, int32_t* __restrict__ experts,
                                   float* __restrict__ weights, bool shared, GroupedPlan plan) {
  for (int64_t t = threadIdx.x / 32; t < T; t += blockDim.x / 32) {
    GateTopKWarp(logits, t, E, k, norm_topk_prob, experts, weights);
  }
  __threadfence_block();
  __syncthreads();
  BuildGroupedPlanBlock(experts, nullptr, T * k, k, T, E, shared, plan);
}

// Token t's assignments are [t·k, t·k + k), or [token_offsets[t], token_offsets[t + 1]).
__global__ void CombineKernel(const float* __restrict__ expert_out, GroupedPlan plan,
                              const float* __restrict__ weights,
                              const int32_t* __restrict__ token_offsets, int k, bool routed,
                              int shared_group, int64_t H, bool accumulate, float* __restrict__ y) {
  const int64_t t = blockIdx.x;
  const int64_t shared_row = shared_group >= 0 ? plan.group_offset[shared_group] + t : -1;
  const int64_t first = token_offsets != nullptr ? token_offsets[t] : t * k;
  const int64_t last = token_offsets != nullptr ? token_offsets[t + 1] : t * k + k;
  for (int64_t i = threadIdx.x; i < H; i += blockDim.x) {
    float sum = 0.0f;
    if (routed) {
      for (int64_t a = first; a < last; ++a) {
        sum += weights[a] * expert_out[static_cast<int64_t>(plan.assign_row[a]) * H + i];
      }
    }
    if (shared_row >= 0) sum += expert_out[shared_row * H + i];
    y[t * H + i] = accumulate ? y[t * H + i] + sum : sum;
  }
}

}  // namespace

int64_t MaxGroupedTiles(int64_t T, int64_t k, int64_t num_groups) {
  return MaxGroupedTilesForRows(T * (k + 1), num_groups);
}

int64_t MaxGroupedTilesForRows(int64_t rows, int64_t num_groups) {
  // Each group's last tile may be partial (+ num_groups), and every tile holds >= 1 row: the
  // second bound keeps the grid of a decode step small.
  return std::min((rows + kGroupedTileRows - 1) / kGroupedTileRows + num_groups, rows);
}

cudaError_t LaunchGateTopK(const float* logits, int64_t T, int E, int k, bool norm_topk_prob,
                           int32_t* experts, float* weights, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (E > 32 * kMaxExpertsPerLane || k < 1 || k > E) return cudaErrorInvalidValue;
  constexpr int kWarpsPerBlock = 4;
  const unsigned blocks = static_cast<unsigned>((T + kWarpsPerBlock - 1) / kWarpsPerBlock);
  GateTopKKernel<<<blocks, kWarpsPerBlock * 32, 0, stream>>>(logits, T, E, k, norm_topk_prob,
                                                             experts, weights);
  return cudaGetLastError();
}

cudaError_t LaunchBuildGroupedPlan(const int32_t* experts, int64_t T, int k, int E, bool routed,
                                   bool shared, GroupedPlan plan, cudaStream_t stream) {
  if (E + 1 > kMaxGroups || T * k > 65536) return cudaErrorInvalidValue;
  BuildGroupedPlanKernel<<<1, 1024, 0, stream>>>(experts, nullptr, routed ? T * k : 0, k, T, E,
                                                 shared, plan);
  return cudaGetLastError();
}

cudaError_t LaunchBuildAssignmentPlan(const int32_t* experts, const int32_t* tokens, int64_t A,
                                      int E, GroupedPlan plan, cudaStream_t stream) {
  if (E > kMaxGroups || A > 65536) return cudaErrorInvalidValue;
  BuildGroupedPlanKernel<<<1, 1024, 0, stream>>>(experts, tokens, A, 1, 0, E, false, plan);
  return cudaGetLastError();
}

cudaError_t LaunchRouteAndPlan(const float* logits, int64_t T, int E, int k, bool norm_topk_prob,
                               int32_t* experts, float* weights, bool shared, GroupedPlan plan,
                               cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (E > 32 * kMaxExpertsPerLane || k < 1 || k > E || E + 1 > kMaxGroups || T * k > 65536) {
    return cudaErrorInvalidValue;
  }
  RouteAndPlanKernel<<<1, 1024, 0, stream>>>(logits, T, E, k, norm_topk_prob, experts, weights,
                                             shared, plan);
  return cudaGetLastError();
}

cudaError_t LaunchCombine(const float* expert_out, GroupedPlan plan, const float* weights,
                          int64_t T, int k, bool routed, int shared_group, int64_t H,
                          bool accumulate, float* y, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  CombineKernel<<<static_cast<unsigned>(T), 256, 0, stream>>>(
      expert_out, plan, weights, nullptr, k, routed, shared_group, H, accumulate, y);
  return cudaGetLastError();
}

cudaError_t LaunchCombineAssignments(const float* expert_out, GroupedPlan plan,
                                     const float* weights, const int32_t* token_offsets, int64_t T,
                                     int64_t H, float* y, cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  CombineKernel<<<static_cast<unsigned>(T), 256, 0, stream>>>(
      expert_out, plan, weights, token_offsets, 0, true, -1, H, false, y);
  return cudaGetLastError();
}

}  // namespace dsmoe::cuda
