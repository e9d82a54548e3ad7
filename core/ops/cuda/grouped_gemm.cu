// Grouped expert GEMMs: every routed expert (and the shared expert) of a layer in one launch.
//
// Work list. LaunchBuildGroupedPlan cut each group's rows into tiles of kGroupedTileRows rows;
// block (x, y) computes tile y (if it exists: the grid is sized for the worst case, so it does
// not depend on the routing and the launch can live in a CUDA graph) against output features
// [x·kBlockFeatures, +kBlockFeatures) of its group's weight matrix, and exits when the group is
// narrower. Experts no token chose cost nothing: no tile names them.
//
// The product is computed "swapped" — features × rows = W · Xᵀ — so the weight tile is the
// tensor-core A operand (row-major [feature, K], exactly the checkpoint layout) and the few
// token rows are B: at decode (1 row per expert) the kernel streams each chosen expert's weights
// once, and at large batches every weight tile is read once per 32 rows. bf16 tensor cores
// (WMMA 16×16×16), fp32 accumulation, a 3-stage cp.async pipeline over K.
//
// Gate/up: the block loads gate rows f and up rows W + f together and applies SiLU-mul in the
// epilogue, so the [rows, 2W] intermediate never reaches memory.
//
// Small batches (decode) take a GEMV-shaped kernel instead: a group then has a handful of rows,
// so the tensor-core tile is mostly padding and its K loop is a chain of dependent pipeline
// waits. There one warp owns one output feature of one tile: it streams the feature's weight
// row(s) with 16-byte loads (all independent, so the row is in flight at once) and dots them with
// up to 8 grouped rows at a time, re-reading the row from cache for more rows.
#include <cuda_bf16.h>
#include <mma.h>

#include "core/ops/cuda/cuda_ops.h"
#include "core/ops/cuda/kernel_util.cuh"

namespace dsmoe::cuda {

namespace {

using namespace nvcuda;

constexpr int kBlockFeatures = 32;            // BM
constexpr int kBlockRows = kGroupedTileRows;  // BN
constexpr int kBlockK = 64;                   // BK
constexpr int kStages = 3;
constexpr int kPad = 8;              // bf16 elements; keeps rows 16-byte aligned
constexpr int kLd = kBlockK + kPad;  // smem row stride (elements)
constexpr int kThreads = 128;        // 4 warps: 2 (features) × 2 (rows) of 16×16

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill, nothing is read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <bool kGlu>
struct Smem {
  static constexpr int kA = kGlu ? 2 : 1;  // gate (+ up) tiles
  union {
    struct {
      __nv_bfloat16 a[kStages][kA][kBlockFeatures][kLd];
      __nv_bfloat16 b[kStages][kBlockRows][kLd];
    } pipe;
    float c[kA][kBlockRows][kBlockFeatures + 4];  // epilogue: [row][feature]
  };
};

// kGlu: out = act (bf16, [rows, ld_out]) from x rows gathered through row_token, weights
//       gate_up[g] ([2W, K], K = H).
// !kGlu: out = fp32 [rows, H] from act rows (row r reads act[r]), weights down[g] ([H, W], K = W).
template <bool kGlu>
__global__ void __launch_bounds__(kThreads)
    GroupedGemmKernel(const __nv_bfloat16* __restrict__ in, int64_t ld_in, GroupedPlan plan,
                      GroupedWeights w, void* __restrict__ out, int64_t ld_out) {
  __shared__ __align__(128) Smem<kGlu> smem;
  const int tile = blockIdx.y;
  if (tile >= *plan.num_tiles) return;
  const int g = plan.tile_group[tile];
  const int row0 = plan.tile_row[tile];
  const int rows = min(kBlockRows, plan.group_offset[g + 1] - row0);
  const int W = w.width[g];
  const int N = kGlu ? W : w.hidden;  // output features of this group
  const int K = kGlu ? w.hidden : W;  // reduction length
  const int f0 = blockIdx.x * kBlockFeatures;
  if (f0 >= N) return;
  const __nv_bfloat16* weight =
      reinterpret_cast<const __nv_bfloat16*>(kGlu ? w.gate_up[g] : w.down[g]);

  // Loader: each thread moves 16-byte chunks (8 elements) of the A and B tiles.
  auto load_stage = [&](int stage, int k0) {
    constexpr int kChunksPerRow = kBlockK / 8;
    for (int c = threadIdx.x; c < kBlockFeatures * kChunksPerRow; c += kThreads) {
      const int f = c / kChunksPerRow, kc = (c % kChunksPerRow) * 8;
      const bool valid = f0 + f < N && k0 + kc < K;
      const __nv_bfloat16* src =
          valid ? weight + static_cast<int64_t>(f0 + f) * K + k0 + kc : weight;
      CpAsync16(&smem.pipe.a[stage][0][f][kc], src, valid);
      if constexpr (kGlu) {
        const __nv_bfloat16* src_up = valid ? src + static_cast<int64_t>(W) * K : weight;
        CpAsync16(&smem.pipe.a[stage][1][f][kc], src_up, valid);
      }
    }
    for (int c = threadIdx.x; c < kBlockRows * kChunksPerRow; c += kThreads) {
      const int r = c / kChunksPerRow, kc = (c % kChunksPerRow) * 8;
      const bool valid = r < rows && k0 + kc < K;
      const __nv_bfloat16* src = in;
      if (valid) {
        const int64_t src_row = kGlu ? plan.row_token[row0 + r] : row0 + r;
        src = in + src_row * ld_in + k0 + kc;
      }
      CpAsync16(&smem.pipe.b[stage][r][kc], src, valid);
    }
  };

  const int warp = threadIdx.x / 32;
  const int wf = (warp / 2) * 16, wr = (warp % 2) * 16;  // this warp's 16 features × 16 rows
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[Smem<kGlu>::kA];
#pragma unroll
  for (int a = 0; a < Smem<kGlu>::kA; ++a) wmma::fill_fragment(acc[a], 0.0f);

  const int num_k = (K + kBlockK - 1) / kBlockK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_k) load_stage(s, s * kBlockK);
    CpAsyncCommit();
  }
  for (int kt = 0; kt < num_k; ++kt) {
    CpAsyncWait<kStages - 2>();
    __syncthreads();  // stage kt is visible to all; stage kt-1 is no longer being read
    const int next = kt + kStages - 1;
    if (next < num_k) load_stage(next % kStages, next * kBlockK);
    CpAsyncCommit();
    const int stage = kt % kStages;
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
      wmma::load_matrix_sync(b, &smem.pipe.b[stage][wr][kk], kLd);
#pragma unroll
      for (int a = 0; a < Smem<kGlu>::kA; ++a) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> af;
        wmma::load_matrix_sync(af, &smem.pipe.a[stage][a][wf][kk], kLd);
        wmma::mma_sync(acc[a], af, b, acc[a]);
      }
    }
  }
  CpAsyncWait<0>();
  __syncthreads();  // the pipeline's smem becomes the epilogue's
#pragma unroll
  for (int a = 0; a < Smem<kGlu>::kA; ++a) {
    // Column-major store of the features × rows tile = row-major [row][feature].
    wmma::store_matrix_sync(&smem.c[a][wr][wf], acc[a], kBlockFeatures + 4, wmma::mem_col_major);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kBlockRows * kBlockFeatures; i += kThreads) {
    const int r = i / kBlockFeatures, f = i % kBlockFeatures;
    if (r >= rows || f0 + f >= N) continue;
    const int64_t o = static_cast<int64_t>(row0 + r) * ld_out + f0 + f;
    if constexpr (kGlu) {
      const float gate = smem.c[0][r][f], up = smem.c[1][r][f];
      static_cast<__nv_bfloat16*>(out)[o] = __float2bfloat16_rn(gate / (1.0f + expf(-gate)) * up);
    } else {
      static_cast<float*>(out)[o] = smem.c[0][r][f];
    }
  }
}

constexpr int kGemvWarps = 8;  // warps (output features) per block

// Same contract as GroupedGemmKernel; a warp computes one output feature of one tile (more per
// warp shrank the grid of these narrow matrices and lost bandwidth on an H200).
template <bool kGlu, int kRows>
__global__ void __launch_bounds__(kGemvWarps * 32)
    GroupedGemvKernel(const __nv_bfloat16* __restrict__ in, int64_t ld_in, GroupedPlan plan,
                      GroupedWeights w, void* __restrict__ out, int64_t ld_out) {
  constexpr int kA = kGlu ? 2 : 1;  // weight rows per feature: gate (and up)
  const int tile = blockIdx.y;
  if (tile >= *plan.num_tiles) return;
  const int g = plan.tile_group[tile];
  const int row0 = plan.tile_row[tile];
  const int tile_rows = min(kGroupedTileRows, plan.group_offset[g + 1] - row0);
  const int W = w.width[g];
  const int N = kGlu ? W : w.hidden;
  const int K = kGlu ? w.hidden : W;
  const int f = blockIdx.x * kGemvWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (f >= N) return;
  const uint16_t* weight = reinterpret_cast<const uint16_t*>(kGlu ? w.gate_up[g] : w.down[g]);
  const uint16_t* wrow[kA];  // feature f's gate row, then (kGlu) its up row W + f
#pragma unroll
  for (int a = 0; a < kA; ++a) wrow[a] = weight + (static_cast<int64_t>(a) * W + f) * K;
  const uint16_t* x = reinterpret_cast<const uint16_t*>(in);

  for (int r0 = 0; r0 < tile_rows; r0 += kRows) {
    const int rows = min(kRows, tile_rows - r0);
    const uint16_t* xr[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int row = row0 + r0 + min(r, rows - 1);
      xr[r] = x + (kGlu ? plan.row_token[row] : row) * ld_in;
    }
    float acc[kA][kRows] = {};
#pragma unroll 4
    for (int c = lane * 8; c < K; c += 32 * 8) {
      float wf[kA][8];
#pragma unroll
      for (int a = 0; a < kA; ++a) {
        UnpackBf16x8(__ldg(reinterpret_cast<const uint4*>(wrow[a] + c)), wf[a]);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          float xf[8];
          UnpackBf16x8(*reinterpret_cast<const uint4*>(xr[r] + c), xf);
#pragma unroll
          for (int a = 0; a < kA; ++a) {
#pragma unroll
            for (int d = 0; d < 8; ++d) acc[a][r] += wf[a][d] * xf[d];
          }
        }
      }
    }
    // Warp sums; lane r writes row r.
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
#pragma unroll
      for (int a = 0; a < kA; ++a) {
        for (int o = 16; o > 0; o >>= 1) acc[a][r] += __shfl_xor_sync(0xffffffffu, acc[a][r], o);
      }
      if (lane == r && r < rows) {
        const int64_t o = static_cast<int64_t>(row0 + r0 + r) * ld_out + f;
        if constexpr (kGlu) {
          const float gate = acc[0][r], up = acc[1][r];
          static_cast<__nv_bfloat16*>(out)[o] =
              __float2bfloat16_rn(gate / (1.0f + expf(-gate)) * up);
        } else {
          static_cast<float*>(out)[o] = acc[0][r];
        }
      }
    }
  }
}

template <bool kGlu, int kRows>
void LaunchGroupedGemv(dim3 grid, const __nv_bfloat16* in, int64_t ld_in, GroupedPlan plan,
                       GroupedWeights w, void* out, int64_t ld_out, cudaStream_t stream) {
  GroupedGemvKernel<kGlu, kRows>
      <<<grid, kGemvWarps * 32, 0, stream>>>(in, ld_in, plan, w, out, ld_out);
}

template <bool kGlu>
cudaError_t LaunchGrouped(const uint16_t* in, int64_t ld_in, int64_t T, int k, GroupedPlan plan,
                          GroupedWeights w, void* out, int64_t ld_out, GroupedAlgo algo,
                          cudaStream_t stream) {
  if (T <= 0) return cudaSuccess;
  if (w.hidden % 8 != 0 || w.max_width % 8 != 0) return cudaErrorInvalidValue;
  if (algo == GroupedAlgo::kAuto) {
    algo = T <= kGroupedGemvMaxTokens ? GroupedAlgo::kGemv : GroupedAlgo::kTensorCore;
  }
  const int features = kGlu ? w.max_width : w.hidden;
  const unsigned tiles = static_cast<unsigned>(MaxGroupedTiles(T, k, w.num_groups));
  const auto* x = reinterpret_cast<const __nv_bfloat16*>(in);
  if (algo == GroupedAlgo::kGemv) {
    const dim3 grid((features + kGemvWarps - 1) / kGemvWarps, tiles);
    switch (GemvRowsPerPass(T)) {
      case 1:
        LaunchGroupedGemv<kGlu, 1>(grid, x, ld_in, plan, w, out, ld_out, stream);
        break;
      case 2:
        LaunchGroupedGemv<kGlu, 2>(grid, x, ld_in, plan, w, out, ld_out, stream);
        break;
      case 4:
        LaunchGroupedGemv<kGlu, 4>(grid, x, ld_in, plan, w, out, ld_out, stream);
        break;
      default:
        LaunchGroupedGemv<kGlu, 8>(grid, x, ld_in, plan, w, out, ld_out, stream);
    }
  } else {
    const dim3 grid((features + kBlockFeatures - 1) / kBlockFeatures, tiles);
    GroupedGemmKernel<kGlu><<<grid, kThreads, 0, stream>>>(x, ld_in, plan, w, out, ld_out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchGroupedGateUp(const uint16_t* x_bf16, int64_t T, int k, GroupedPlan plan,
                                GroupedWeights w, uint16_t* act_bf16, cudaStream_t stream,
                                GroupedAlgo algo) {
  return LaunchGrouped<true>(x_bf16, w.hidden, T, k, plan, w, act_bf16, w.max_width, algo, stream);
}

cudaError_t LaunchGroupedDown(const uint16_t* act_bf16, int64_t T, int k, GroupedPlan plan,
                              GroupedWeights w, float* out, cudaStream_t stream, GroupedAlgo algo) {
  return LaunchGrouped<false>(act_bf16, w.max_width, T, k, plan, w, out, w.hidden, algo, stream);
}

}  // namespace dsmoe::cuda
