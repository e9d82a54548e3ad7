// Per-ISA compute primitives on fp32 activations. Weights may be F32, BF16 or F16 and are
// converted to fp32 on the fly inside the kernels (accumulation is always fp32).
//
// Each ISA fills one KernelTable: `reference` (plain scalar C++, the ground truth every fast
// kernel is tested against) and `avx2` (AVX2 + FMA + F16C). Kernels() picks the best one the
// running CPU supports, once.
#pragma once

#include <cstdint>

#include "core/tensor/tensor.h"

namespace dsmoe::ops {

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
  // One query's attention over `len` cached positions (head size hd):
  //   scores[p] = scale · q·K[p],  out = Σ_p softmax(scores)[p] · V[p],
  // where K[p] = keys + p·stride and V[p] = values + p·stride. `scores` holds len floats.
  void (*attend)(const float* q, const float* keys, const float* values, int64_t stride,
                 int64_t len, int64_t hd, float scale, float* scores, float* out);
  // Causal attention of Q consecutive queries of one sequence (prefill): query i (at
  // q + i·q_stride, output at out + i·out_stride) is at position first + i and attends to cached
  // positions [0, first + i]. Same K/V layout as `attend`; `scratch` holds 8·(first + Q) + 80·hd
  // floats. Reading each cached row once for several queries is what keeps long prompts fast.
  void (*attend_causal)(const float* q, int64_t q_stride, int64_t Q, int64_t first,
                        const float* keys, const float* values, int64_t stride, int64_t hd,
                        float scale, float* scratch, float* out, int64_t out_stride);
};

const KernelTable& ReferenceKernels();
// Null when this binary was built without them; callers must also check the CPU.
const KernelTable* Avx2Kernels();
// The best table for this CPU (thread-safe, chosen on first call).
const KernelTable& Kernels();

}  // namespace dsmoe::ops
