// Per-ISA compute primitives on fp32 activations. Weights may be F32, BF16 or F16 and are
// converted to fp32 on the fly inside the kernels (accumulation is always fp32).
//
// Each ISA fills one KernelTable: `reference` (plain scalar C++, the ground truth every fast
// kernel is tested against), `avx2` (AVX2 + FMA + F16C), `avx512` (AVX-512 F/BW/VL/VNNI/BF16),
// `amx` (the avx512 table with batches on Intel AMX tiles, exact mode) and `avx512bf16` (BF16
// activations from 48 tokens: faster where `vdpbf16ps` pays, not exact). Kernels() picks the best
// exact one the running CPU supports, once; DSMOE_KERNELS=<name> forces one (for benchmarks and
// A/B comparisons).
#pragma once

#include <cstdint>
#include <string_view>

#include "core/tensor/tensor.h"

namespace dsmoe {
class Logger;
}  // namespace dsmoe

namespace dsmoe::ops {

// The cached keys and values of one sequence and one kv head, in pages of 2^page_shift
// positions: position p lives in page pages[p >> page_shift] at row p & (page_tokens - 1), its
// key at element keys + page · page_stride + row · stride (values likewise). pages == nullptr:
// one contiguous run, K[p] = keys + p · stride. Rows within a page are `stride` apart, so the
// kernels read runs of 2^page_shift positions as they would an unpaged cache.
//
// Elements are `dtype`: kF32, or kBF16 (storage only: the kernels widen each element to fp32
// in registers, a shift, and do all arithmetic in fp32; nothing copies the cache widened).
// Strides count elements, not bytes.
struct KvPages {
  const void* keys = nullptr;
  const void* values = nullptr;
  int64_t stride = 0;              // elements between consecutive positions of a page
  const int32_t* pages = nullptr;  // the sequence's block table; null: contiguous
  int page_shift = 62;             // log2(positions per page)
  int64_t page_stride = 0;         // elements between pages
  DType dtype = DType::kF32;       // kF32 or kBF16

  int64_t Offset(int64_t p) const {
    if (pages == nullptr) return p * stride;
    return pages[p >> page_shift] * page_stride + (p & ((int64_t{1} << page_shift) - 1)) * stride;
  }
  // Position p's key and value rows as elements of type T (float for kF32, uint16_t for kBF16).
  template <class T = float>
  const T* Key(int64_t p) const {
    return static_cast<const T*>(keys) + Offset(p);
  }
  template <class T = float>
  const T* Value(int64_t p) const {
    return static_cast<const T*>(values) + Offset(p);
  }
  // Positions from p on that lie in p's page (all of [p, len) when contiguous).
  int64_t RunFrom(int64_t p, int64_t len) const {
    if (pages == nullptr) return len - p;
    const int64_t end = ((p >> page_shift) + 1) << page_shift;
    return (end < len ? end : len) - p;
  }
};

struct KernelTable {
  const char* name;
  // y[t * ldy + n] = Σ_k x[t * W.cols + k] · W[n, k]   for t in [0, T), n in [row_begin, row_end).
  void (*matmul_rows)(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                      int64_t row_end, float* y, int64_t ldy);
  float (*dot)(const float* a, const float* b, int64_t n);
  // y[i] += a · x[i]
  void (*axpy)(float a, const float* x, float* y, int64_t n);
  // out[i] = silu(gate[i]) · up[i]  (SwiGLU; silu(g) = g / (1 + e^-g))
  void (*silu_mul)(const float* gate, const float* up, float* out, int64_t n);
  // out[i] = row[i] as fp32
  void (*row_to_f32)(const void* row, DType dtype, int64_t n, float* out);
  // One query's attention over `len` cached positions of one kv head (head size hd):
  //   scores[p] = scale · q·K[p],  out = Σ_p softmax(scores)[p] · V[p],
  // with K[p] = kv.Key(p) and V[p] = kv.Value(p) (paged or contiguous, F32 or BF16, see
  // KvPages; fp32 arithmetic either way). `scores` holds len floats.
  void (*attend)(const float* q, const KvPages& kv, int64_t len, int64_t hd, float scale,
                 float* scores, float* out);
  // Causal attention of Q consecutive queries of one sequence (prefill): query i (at
  // q + i·q_stride, output at out + i·out_stride) is at position first + i and attends to cached
  // positions [0, first + i]. Same K/V as `attend`; `scratch` holds 8·(first + Q) + 80·hd
  // floats. Reading each cached row once for several queries is what keeps long prompts fast.
  void (*attend_causal)(const float* q, int64_t q_stride, int64_t Q, int64_t first,
                        const KvPages& kv, int64_t hd, float scale, float* scratch, float* out,
                        int64_t out_stride);
  // From this many tokens on, matmul_rows on BF16 weights multiplies activations rounded to
  // BF16 (round to nearest even: relative error ≤ 2^-8 each; the products are exact and summed
  // in fp32, `vdpbf16ps`, which also treats BF16 subnormals as zero); 0: never, the activations
  // stay fp32.
  int64_t bf16_activation_min_tokens = 0;
  // Q8_0 decode (≤ 4 tokens) rounds activations to 16 bits of their block of 32's largest
  // magnitude in every fast table; from this many tokens on Q8_0 batches do too (the int32 sum
  // of a block, ≤ 2^31, then rounds to fp32: relative error ≤ 2^-24); 0: never, batches
  // multiply fp32 activations.
  int64_t q8_activation_min_tokens = 0;

  // Optional (null in tables that convert x inside matmul_rows): the activations of a batch
  // prepared once for every row task of a matrix. A caller that splits a matrix's rows over
  // tasks (ops::Linear, RunMlps) would otherwise pay the conversion of all of x in every task.
  // prepared_size(T, K, dtype): bytes that x [T, K] takes prepared for weights of `dtype` (a
  // buffer 64-byte aligned is fastest); 0: this table does not prepare for this case (decode,
  // a dtype it multiplies otherwise) and the caller uses matmul_rows.
  int64_t (*prepared_size)(int64_t T, int64_t K, DType dtype) = nullptr;
  // Prepares tokens [t0, t1) of x [T, K] (t0 a multiple of 16; t1 ≤ T) into `prepared`, which
  // holds prepared_size(T, K, dtype) bytes for all T tokens: several threads may prepare
  // disjoint slices of one buffer at once.
  void (*prepare)(const float* x, int64_t T, int64_t K, DType dtype, int64_t t0, int64_t t1,
                  void* prepared) = nullptr;
  // matmul_rows' result (same contract and numerics) from x prepared for W.cols and W.dtype.
  // Read-only on `prepared`: every row task of the matrix, on any thread, reads the same one.
  void (*matmul_rows_prepared)(const void* prepared, int64_t T, const MatrixView& W,
                               int64_t row_begin, int64_t row_end, float* y, int64_t ldy) = nullptr;
};

const KernelTable& ReferenceKernels();
// Null when this binary was built without them; callers must also check the CPU.
const KernelTable* Avx2Kernels();
const KernelTable* Avx512Kernels();
const KernelTable* Avx512Bf16DotKernels();
// The avx512 table with batches (>= 16 tokens) of BF16 and Q8_0 weights on Intel AMX tiles, in
// exact mode (core/ops/cpu/amx_gemm.h); callers must also check AmxUsable().
const KernelTable* Avx512AmxKernels();
// The table called `name` ("reference", "avx2", "avx512", "amx", "avx512bf16") if this binary
// has it and this CPU can run it, else null.
const KernelTable* KernelsNamed(std::string_view name);
// The best table for this CPU, or the one `forced` names (null or empty: none); a name that is
// unknown or that this CPU cannot run is logged as a warning and the best table used instead.
const KernelTable& ChooseKernels(const char* forced, Logger& logger);
// ChooseKernels(getenv("DSMOE_KERNELS"), the default logger), once (thread-safe, on first
// call): DSMOE_KERNELS=reference|avx2|avx512|amx|avx512bf16 forces a table.
const KernelTable& Kernels();

}  // namespace dsmoe::ops
