// Matrix multiplication on Intel AMX tiles (Sapphire Rapids and later), for prompt chunks:
// batches of 16 tokens or more, where the kernels are bound by compute, not by reading weights.
//
// AmxMatMulRows has exactly KernelTable::matmul_rows' contract (core/ops/kernels.h) for BF16
// and Q8_0 weights; it is meant to be called only where AmxUsable() is true. Numerics: the
// activations are rounded to BF16 (round to nearest even) and every product is accumulated in
// fp32 by TDPBF16PS, so the result equals the exact dot product of BF16(x) and W up to fp32
// accumulation error, and differs from the fp32 reference by at most Σ_k |x_k·W[n,k]|·2^-8
// beyond that (the relative rounding error of BF16). Q8_0 weights are dequantized (q · d,
// exact in fp32) and rounded to BF16 as they are packed, another 2^-8 relative per weight —
// the order of Q8_0's own quantization step, and smaller than quantizing the activations to
// int8 per block would add (see amx_gemm.cc for why not TDPBSSD).
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

// y[t * ldy + n] = Σ_k x[t * W.cols + k] · W[n, k]   for t in [0, T), n in [row_begin, row_end).
// REQUIRES: AmxUsable(); AmxSupports(W.dtype) (other dtypes, and Q8_0 rows that are not whole
// blocks of 32, leave y untouched). Any T >= 1, K and row range are correct; T >= 16 is where
// it pays.
void AmxMatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                   int64_t row_end, float* y, int64_t ldy);

// The same product from activations packed once for every row task of one matrix:
// AmxMatMulRows converts x [T, K] to BF16 tiles on each call, which costs about as much as
// reading x (T·K floats, ~0.25 ms for 512 × 2048 here: x does not fit in L2), so a matrix
// split into 16 row chunks pays it 16 times. A caller that splits rows packs x once with
// AmxPackActivations into AmxPackedActivationsSize(T, K) uint16_t values (any alignment;
// 64 bytes is best) and hands the same buffer to AmxMatMulRowsPacked from every thread.
// Tokens are packed 16 to a tile, tiles in order, so tokens [16i, T) packed from x + 16i·K
// land at packed + AmxPackedActivationsSize(16i, K): threads may pack disjoint slices.
int64_t AmxPackedActivationsSize(int64_t T, int64_t K);
void AmxPackActivations(const float* x, int64_t T, int64_t K, uint16_t* packed);
// REQUIRES: as AmxMatMulRows; `packed` holds x [T, W.cols] from AmxPackActivations.
void AmxMatMulRowsPacked(const uint16_t* packed, int64_t T, const MatrixView& W, int64_t row_begin,
                         int64_t row_end, float* y, int64_t ldy);

// The weight dtypes AmxMatMulRows computes.
bool AmxSupports(DType dtype);

}  // namespace dsmoe::ops
