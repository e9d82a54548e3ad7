// Launchers of dsmoe's CUDA kernels: the GPU counterparts of core/ops (kernels.h, ops.h) and of
// the pieces of core/model that are computed per token (RoPE, attention, the gate, grouped
// experts). Every launcher enqueues on the stream it is given and returns the launch's
// cudaError_t (cudaGetLastError right after the launch); none allocates or synchronises, so all
// of them can be captured in a CUDA graph.
//
// Conventions. Activations are fp32 unless named *_bf16; bf16 values travel as their raw bits
// (uint16_t) so that this header needs no CUDA C++ types and host code compiled by the C++
// compiler can include it. Weights are bf16, row-major [out, in] as in the checkpoint
// (a linear layer computes y = x·Wᵀ). Everything accumulates in fp32. Shapes are in comments
// as [rows, cols].
//
// Every kernel here is tested against the CPU reference (core/ops/kernels.h, core/model/gate.h)
// in tests/cuda/cuda_ops_test.cc.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dsmoe::cuda {

// ---- Element-wise and per-row ----------------------------------------------------------------

// out[t] = bf16(w ⊙ x[r] · rsqrt(mean(x[r]²) + eps)) with r = rows ? rows[t] : t, t in [0, T).
// Also writes the fp32 result to out_f32 when it is not null. (HF DeepseekRMSNorm; the variance
// in fp32.) x [*, H], out [T, H].
cudaError_t LaunchRmsNorm(const float* x, const float* weight, const int32_t* rows, int64_t T,
                          int64_t H, float eps, uint16_t* out_bf16, float* out_f32,
                          cudaStream_t stream);

// h[t] = float(table[ids[t]]): table [V, H] bf16, h [T, H].
cudaError_t LaunchEmbed(const uint16_t* table, const int32_t* ids, int64_t T, int64_t H, float* h,
                        cudaStream_t stream);

// out[t, i] = bf16(silu(gu[t, i]) · gu[t, W + i]) for i < W: gu [T, 2W] holds gate then up.
cudaError_t LaunchSiluMul(const float* gate_up, int64_t T, int64_t W, uint16_t* out_bf16,
                          cudaStream_t stream);

// y[i] += x[i] (the residual add).
cudaError_t LaunchAddInPlace(const float* x, float* y, int64_t n, cudaStream_t stream);

// y[t, n] += bias[n]: y [T, N].
cudaError_t LaunchAddBias(const float* bias, int64_t T, int64_t N, float* y, cudaStream_t stream);

// out[i] = bf16(x[i]), round to nearest even.
cudaError_t LaunchF32ToBf16(const float* x, int64_t n, uint16_t* out, cudaStream_t stream);

// ---- Dense projections of small batches ------------------------------------------------------

// y[T, N] = x[T, K]·Wᵀ (+ y when accumulate), W [N, K] bf16, x bf16, fp32 accumulation: one warp
// per output feature, for the few rows of a decode step (cuBLAS is faster from a few dozen rows;
// see kGemvMaxTokens). K % 8 == 0 and 16-byte aligned rows, else cudaErrorInvalidValue.
cudaError_t LaunchGemvBf16(const uint16_t* x_bf16, int64_t T, const uint16_t* w, int64_t N,
                           int64_t K, bool accumulate, float* y, cudaStream_t stream);
// The same in fp32 (the router: its logits decide the routing, so they stay fp32 end to end).
cudaError_t LaunchGemvF32(const float* x, int64_t T, const float* w, int64_t N, int64_t K, float* y,
                          cudaStream_t stream);
// Batches up to this many tokens take the dense GEMV instead of cuBLAS (see GemvBeatsCublas).
inline constexpr int64_t kGemvMaxTokens = 8;
// Whether the dense GEMV beats cuBLAS for y[T, N] (H200, dsmoe_bench_gpu): for projections of a
// few thousand features at up to 8 rows (3072 × 1024 at batch 1: 9 vs 15 µs); not for the LM
// head's tens of thousands, where cuBLAS already streams the weights well (32000 × 1024: 29 µs
// both at batch 1, 28 vs 44 µs at batch 4).
inline bool GemvBeatsCublas(int64_t T, int64_t N) { return T <= kGemvMaxTokens && N < 8192; }

// ---- Attention over a paged KV cache ---------------------------------------------------------

// One layer's view of the paged cache. Keys and values are bf16, [num_pages, page_size, nkv, hd];
// position p of slot s lives in page page_table[s · pages_per_slot + p / page_size] at row
// p % page_size.
struct PagedKvLayer {
  uint16_t* keys = nullptr;
  uint16_t* values = nullptr;
  const int32_t* page_table = nullptr;  // [num_slots, pages_per_slot]
  int32_t pages_per_slot = 0;
  int32_t page_size = 0;
};

// On qkv [T, (nh + 2·nkv)·hd] (q heads, then k heads, then v heads of each token): adds `bias`
// when not null ([(nh + 2·nkv)·hd]), rotates q and k in place by RoPE at positions[t] (HF
// rotate_half: dims i and i + hd/2 pair; cos/sin [max_context, hd/2] tables with any linear
// scaling already applied), then stores the token's k and v at (slots[t], positions[t]) in `kv`.
cudaError_t LaunchRopeKvWrite(float* qkv, const float* bias, const int32_t* positions,
                              const int32_t* slots, const float* cos, const float* sin, int64_t T,
                              int nh, int nkv, int hd, PagedKvLayer kv, cudaStream_t stream);

// out[t, h] = softmax(q[t, h]·K[0..p]ᵀ · scale) · V[0..p] with p = positions[t], K/V those of
// slots[t] and kv head h / (nh / nkv) (GQA). q is read from qkv [T, (nh + 2·nkv)·hd].
// out [T, nh·hd] bf16. hd <= 256. Decode and prefill alike (the mask is p).
cudaError_t LaunchPagedAttention(const float* qkv, const int32_t* positions, const int32_t* slots,
                                 int64_t T, int nh, int nkv, int hd, float scale, PagedKvLayer kv,
                                 uint16_t* out_bf16, cudaStream_t stream);

// ---- The gate ---------------------------------------------------------------------------------

// As RouteTokens (core/model/gate.h): softmax over the E logits of each token, the top k in
// descending weight (ties to the lower index), renormalised iff norm_topk_prob and k > 1.
// logits [T, E], experts/weights [T, k]. E <= 256, k <= E.
cudaError_t LaunchGateTopK(const float* logits, int64_t T, int E, int k, bool norm_topk_prob,
                           int32_t* experts, float* weights, cudaStream_t stream);

// ---- Grouped expert GEMMs (routed experts and the shared expert, one launch each) --------------

// The routed experts of a layer are groups 0..E-1; the shared expert, if any, is group E with
// every token. A grouped row is one (token, group) pair; rows of a group are contiguous.
inline constexpr int kGroupedTileRows = 32;  // grouped rows per tile (BN of the GEMM kernels)

// Device buffers of one grouping. Sizes for at most T tokens, k experts each, G groups:
//   group_offset [G + 1], cursor [G], row_token [T·(k + 1)], assign_row [T·k],
//   tile_group / tile_row [MaxGroupedTiles(T, k, G)], num_tiles [1].
struct GroupedPlan {
  int32_t* group_offset = nullptr;  // first grouped row of each group; [G] = total rows
  int32_t* cursor = nullptr;        // scratch
  int32_t* row_token = nullptr;     // grouped row → token whose hidden state it reads
  int32_t* assign_row = nullptr;    // assignment t·k + j → its grouped row
  int32_t* tile_group = nullptr;    // tile → group
  int32_t* tile_row = nullptr;      // tile → its first grouped row
  int32_t* num_tiles = nullptr;
};
int64_t MaxGroupedTiles(int64_t T, int64_t k, int64_t num_groups);
int64_t MaxGroupedTilesForRows(int64_t rows, int64_t num_groups);  // any number of grouped rows

// Builds the plan from experts [T, k] (ignored when !routed). num_groups = E + (shared ? 1 : 0).
// One block; T·k <= 65536.
cudaError_t LaunchBuildGroupedPlan(const int32_t* experts, int64_t T, int k, int E, bool routed,
                                   bool shared, GroupedPlan plan, cudaStream_t stream);

// The plan of an expert server's request: A explicit (token, expert) assignments, any number per
// token (assignment a reads row tokens[a] of x), routed groups only. Tiles for
// MaxGroupedTilesForRows(A, E); A <= 65536.
cudaError_t LaunchBuildAssignmentPlan(const int32_t* experts, const int32_t* tokens, int64_t A,
                                      int E, GroupedPlan plan, cudaStream_t stream);

// LaunchGateTopK then LaunchBuildGroupedPlan (routed) in one single-block launch: for decode
// batches (up to kFusedRouteMaxTokens tokens), where the launch costs more than the work.
cudaError_t LaunchRouteAndPlan(const float* logits, int64_t T, int E, int k, bool norm_topk_prob,
                               int32_t* experts, float* weights, bool shared, GroupedPlan plan,
                               cudaStream_t stream);
inline constexpr int64_t kFusedRouteMaxTokens = 16;  // one block: slower than two launches beyond

// Per-group weights, device arrays of num_groups entries (null pointers for groups no token
// can reach, e.g. experts this process does not hold).
struct GroupedWeights {
  const uint16_t* const* gate_up = nullptr;  // [2·W_g, H]: gate rows, then up rows
  const uint16_t* const* down = nullptr;     // [H, W_g]
  const int32_t* width = nullptr;            // W_g
  int num_groups = 0;
  int max_width = 0;  // max W_g; the row stride of `act`
  int hidden = 0;     // H
};

// How the grouped GEMMs run: tensor-core tiles (32 features × 32 rows, WMMA) or, for small
// batches where groups hold a few rows, one warp per output feature streaming its weight row
// (GEMV-shaped). kAuto picks the GEMV up to kGroupedGemvMaxTokens tokens. Same results either way
// up to fp32 summation order.
enum class GroupedAlgo { kAuto, kTensorCore, kGemv };
// Measured on an H200 (dsmoe_bench_gpu, 64 experts of 1024 × 704, top-6): GEMV 14 vs 28 µs at
// batch 1, but 54 vs 49 µs at batch 4 (each expert then has about one row, and the GEMV pays for
// its row-pass bound).
inline constexpr int64_t kGroupedGemvMaxTokens = 2;

// act[r, i] = bf16(silu(x[row_token[r]]·gate_gᵀ)[i] · (x[row_token[r]]·up_gᵀ)[i]) for every grouped
// row r of group g and i < W_g. x [T, H] bf16, act [rows, max_width] bf16. H % 8 == 0,
// W_g % 8 == 0. `T` only sizes the grid (it bounds the rows).
cudaError_t LaunchGroupedGateUp(const uint16_t* x_bf16, int64_t T, int k, GroupedPlan plan,
                                GroupedWeights w, uint16_t* act_bf16, cudaStream_t stream,
                                GroupedAlgo algo = GroupedAlgo::kAuto);

// out[r] = act[r, :W_g]·down_gᵀ for every grouped row r of group g: out [rows, H] fp32.
cudaError_t LaunchGroupedDown(const uint16_t* act_bf16, int64_t T, int k, GroupedPlan plan,
                              GroupedWeights w, float* out, cudaStream_t stream,
                              GroupedAlgo algo = GroupedAlgo::kAuto);

// y[t] (+)= Σ_j weights[t·k + j]·expert_out[assign_row[t·k + j]]  (in routing order, so the sum
// is deterministic) + expert_out[group_offset[shared_group] + t] if shared_group >= 0.
// routed == false skips the first sum. accumulate == false overwrites y. y [T, H].
cudaError_t LaunchCombine(const float* expert_out, GroupedPlan plan, const float* weights,
                          int64_t T, int k, bool routed, int shared_group, int64_t H,
                          bool accumulate, float* y, cudaStream_t stream);

// y[t] = Σ_{a in [token_offsets[t], token_offsets[t + 1])} weights[a]·expert_out[assign_row[a]]
// (assignments sorted by token, summed in order): the combine of LaunchBuildAssignmentPlan.
cudaError_t LaunchCombineAssignments(const float* expert_out, GroupedPlan plan,
                                     const float* weights, const int32_t* token_offsets, int64_t T,
                                     int64_t H, float* y, cudaStream_t stream);

}  // namespace dsmoe::cuda
