// The reference kernels: the plainest correct C++, no intrinsics. Every vectorised kernel is
// tested against these on random shapes (tests/kernels_test.cc).
#include <cmath>

#include "core/ops/kernels.h"

namespace dsmoe::ops {
namespace {

void MatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin, int64_t row_end,
                float* y, int64_t ldy) {
  const int64_t K = W.cols;
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t n = row_begin; n < row_end; ++n) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc += x[t * K + k] * W.At(n, k);
      y[t * ldy + n] = acc;
    }
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void Axpy(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void RowToF32(const void* row, DType dtype, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = LoadAsF32(row, dtype, i);
}

// Element d of a cached row (F32 or BF16) as fp32.
float KvElement(const void* row, DType dtype, int64_t d) { return LoadAsF32(row, dtype, d); }

void Attend(const float* q, const KvPages& kv, int64_t len, int64_t hd, float scale, float* scores,
            float* out) {
  const size_t elem = DTypeSize(kv.dtype);
  auto key = [&](int64_t p) { return static_cast<const char*>(kv.keys) + kv.Offset(p) * elem; };
  auto value = [&](int64_t p) { return static_cast<const char*>(kv.values) + kv.Offset(p) * elem; };
  float max = -INFINITY;
  for (int64_t p = 0; p < len; ++p) {
    float dot = 0.0f;
    for (int64_t d = 0; d < hd; ++d) dot += q[d] * KvElement(key(p), kv.dtype, d);
    scores[p] = dot * scale;
    max = scores[p] > max ? scores[p] : max;
  }
  float sum = 0.0f;
  for (int64_t p = 0; p < len; ++p) sum += scores[p] = std::exp(scores[p] - max);
  for (int64_t i = 0; i < hd; ++i) out[i] = 0.0f;
  for (int64_t p = 0; p < len; ++p) {
    const float w = scores[p] / sum;
    for (int64_t d = 0; d < hd; ++d) out[d] += w * KvElement(value(p), kv.dtype, d);
  }
}

void AttendCausal(const float* q, int64_t q_stride, int64_t Q, int64_t first, const KvPages& kv,
                  int64_t hd, float scale, float* scratch, float* out, int64_t out_stride) {
  for (int64_t i = 0; i < Q; ++i) {
    Attend(q + i * q_stride, kv, first + i + 1, hd, scale, scratch, out + i * out_stride);
  }
}

}  // namespace

const KernelTable& ReferenceKernels() {
  static const KernelTable table{"reference", MatMulRows, Dot,    Axpy,
                                 SiluMul,     RowToF32,   Attend, AttendCausal};
  return table;
}

}  // namespace dsmoe::ops
