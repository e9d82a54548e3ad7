// Matrix multiplication on Intel AMX tiles (Sapphire Rapids and later), for prompt chunks:
// batches of 16 tokens or more, where the kernels are bound by compute, not by reading weights.
//
// AmxMatMulRows has KernelTable::matmul_rows' contract (core/ops/kernels.h) for BF16 and Q8_0
// weights; it is meant to be called only where AmxUsable() is true. Products are accumulated in
// fp32 by TDPBF16PS; how the fp32 activations x reach the BF16 tiles is AmxPrecision's choice:
//   - kExact (the default): each x is split into three BF16 parts that sum to it exactly, and
//     every part is multiplied by the same weight tile, so y is the exact dot product of fp32 x
//     and W up to fp32 accumulation error, like the AVX2 fp32 kernel: batching with it does not
//     change results beyond fp32 rounding. BF16 weights are multiplied as stored; Q8_0 weights
//     as q (exact in BF16), each 32-wide block's sum then scaled by its d in fp32. Three times
//     the tile work of kBf16 (about half its speed in bench/bench_amx.cc);
//   - kBf16x2: two parts, x to within 2^-15 of itself (rounded toward zero); the weights as in
//     kExact; twice the tile work;
//   - kBf16: x rounded to BF16 (round to nearest even), 2^-8 of itself: y differs from the fp32
//     product by up to Σ_k |x_k·W[n,k]|·2^-8. Q8_0 weights are dequantized (q · d, exact in
//     fp32) and rounded to BF16 as they are packed, another 2^-8 relative per weight (in the
//     token-tile orientation; the weight-tile one, AmxLayout below, multiplies q · d exactly). The
//     fastest.
// The exact split is hi = x with its low 16 bits cleared (BF16 by truncation), mid = the same of
// x - hi, lo = x - hi - mid (see amx_gemm.cc). Where it is not exact: TDPBF16PS counts BF16
// denormals (below 2^-126) as zero and flushes denormal fp32 sums, so an |x| under 2^-103 loses
// the parts that fall below 2^-126 (under 2^-125 in all, per activation), fp32 denormal x count
// as zero (in every mode), and a weight that is ±inf gives NaN (0 · ∞ from a zero part) where
// the fp32 product is ±inf. Infinite and NaN activations give what the fp32 product gives.
// (Details, and why not the int8 tiles, in amx_gemm.cc.)
//
// Thread-safe: each call uses thread-local scratch and its own thread's tile state; callers
// split rows across threads as for matmul_rows.
#pragma once

#include <cstdint>

#include "core/tensor/tensor.h"

namespace dsmoe::ops {

// True when the CPU has AMX-TILE, AMX-BF16 and AMX-INT8, the kernel enabled the tile state in
// XCR0, and Linux granted this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM).
// Probed once per process, thread-safe; when false, one line on the default logger says why.
// Runs on any x86-64 (it executes no AMX or AVX-512 instruction itself). Always false on other
// architectures.
bool AmxUsable();

// How the activations are split into BF16 parts; the value is the number of parts, the work
// per product in TDPBF16PS instructions.
enum class AmxPrecision : int {
  kBf16 = 1,    // x rounded to BF16: 2^-8 relative per activation
  kBf16x2 = 2,  // x to within 2^-15 relative
  kExact = 3,   // x exactly (normal x): fp32 x times the weights (Q8_0: q · d)
};

// The weight dtypes AmxMatMulRows computes at `precision`: BF16 and Q8_0 (false for a value
// that is not an AmxPrecision).
bool AmxSupports(DType dtype, AmxPrecision precision = AmxPrecision::kExact);

// y[t * ldy + n] = Σ_k x[t * W.cols + k] · W[n, k]   for t in [0, T), n in [row_begin, row_end).
// REQUIRES: AmxUsable(). A dtype and precision without AmxSupports(W.dtype, precision), and
// Q8_0 rows that are not whole blocks of 32, leave y untouched. Any T >= 1, K and row range are
// correct; T >= 16 is where it pays.
void AmxMatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                   int64_t row_end, float* y, int64_t ldy,
                   AmxPrecision precision = AmxPrecision::kExact);

// The same product from activations packed once for every row task of one matrix:
// AmxMatMulRows converts x [T, K] to BF16 tiles on each call, which costs about as much as
// reading x (T·K floats, ~0.25 ms for 512 × 2048 here: x does not fit in L2), so a matrix
// split into 16 row chunks pays it 16 times. A caller that splits rows packs x once with
// AmxPackActivations into AmxPackedActivationsSize(T, K, precision) uint16_t values (any
// alignment; 64 bytes is best) and hands the same buffer to AmxMatMulRowsPacked, at the same
// precision, from every thread. Tokens are packed 16 to a tile, tiles in order, so tokens
// [16i, T) packed from x + 16i·K land at packed + AmxPackedActivationsSize(16i, K, precision):
// threads may pack disjoint slices.
//
// Packed activations also choose the orientation of the product (AmxLayout):
//   - kTokenTiles: x as A tiles (16 tokens × 32 values), the weights repacked on every call into
//     B tiles (VNNI pairs: a 16 × 16 transposition per 16 rows × 32 values). What
//     AmxMatMulRows does; best when many token tiles share each packed weight block;
//   - kWeightTiles: yᵀ = W · xᵀ, x packed once as B tiles and the weight rows read in place as
//     A tiles (BF16 rows are already an A tile's layout; Q8_0's q are widened to BF16, no
//     transposition), each 16 rows × 16 tokens result transposed once as it is stored. Nothing
//     is repacked per call, which pays for the few tokens a routed expert sees in a prompt
//     chunk. Q8_0 weights are multiplied as q, each block's sum scaled by its d in fp32, at
//     every precision (kBf16 too: its weights are then exact, not rounded to BF16).
// Same numerics otherwise (each product exact in TDPBF16PS, the parts of each block in the same
// order), so kExact's guarantee holds in both.
enum class AmxLayout : int {
  kTokenTiles = 0,
  kWeightTiles = 1,
};
int64_t AmxPackedActivationsSize(int64_t T, int64_t K,
                                 AmxPrecision precision = AmxPrecision::kExact);
void AmxPackActivations(const float* x, int64_t T, int64_t K, uint16_t* packed,
                        AmxPrecision precision = AmxPrecision::kExact,
                        AmxLayout layout = AmxLayout::kTokenTiles);
// REQUIRES: as AmxMatMulRows; `packed` holds x [T, W.cols] from AmxPackActivations at this
// `precision` and `layout`.
void AmxMatMulRowsPacked(const uint16_t* packed, int64_t T, const MatrixView& W, int64_t row_begin,
                         int64_t row_end, float* y, int64_t ldy,
                         AmxPrecision precision = AmxPrecision::kExact,
                         AmxLayout layout = AmxLayout::kTokenTiles);

}  // namespace dsmoe::ops
