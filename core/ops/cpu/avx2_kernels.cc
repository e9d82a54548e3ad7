// AVX2 + FMA + F16C kernels. This file alone is compiled with -mavx2 -mfma -mf16c; nothing
// here runs unless GetCpuFeatures() said the CPU has them (ops/kernels.cc).
#include <immintrin.h>

#include <cmath>

#include "core/ops/kernels.h"

namespace dsmoe::ops {
namespace {

// This file is compiled for AVX2, so it must not instantiate inline functions shared with
// other translation units (the linker could keep this AVX2 copy for a CPU without AVX2).
// Hence local, internal-linkage versions of the few helpers it needs.
inline const void* RowPtr(const MatrixView& W, int64_t r) {
  return static_cast<const char*>(W.data) + static_cast<size_t>(r * W.cols) * (W.dtype == DType::kF32 ? 4 : 2);
}
inline float ScalarLoad(const void* row, DType dtype, int64_t k) {
  if (dtype == DType::kF32) return static_cast<const float*>(row)[k];
  const uint16_t h = static_cast<const uint16_t*>(row)[k];
  if (dtype == DType::kBF16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
  return _cvtsh_ss(h);
}

// Eight weights of a row starting at element k, as fp32.
template <DType D>
inline __m256 Load8(const void* row, int64_t k) {
  if constexpr (D == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(row) + k);
  } else if constexpr (D == DType::kBF16) {
    // bf16 is the top half of an fp32: widen to 32 bits and shift into place.
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    const __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(row) + k));
    return _mm256_cvtph_ps(h);
  }
}

inline float HorizontalSum(__m256 v) {
  const __m128 lo = _mm256_castps256_ps128(v);
  const __m128 hi = _mm256_extractf128_ps(v, 1);
  __m128 s = _mm_add_ps(lo, hi);
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// One register tile: RB weight rows × TB tokens, RB·TB accumulators (≤ 12 of the 16 ymm
// registers, leaving room for the loads). Each weight vector loaded is used TB times.
template <DType D, int RB, int TB>
inline void Tile(const float* x, int64_t K, const MatrixView& W, int64_t n0, float* y, int64_t ldy) {
  __m256 acc[RB][TB];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_setzero_ps();
  const void* rows[RB];
  for (int r = 0; r < RB; ++r) rows[r] = RowPtr(W, n0 + r);
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = _mm256_loadu_ps(x + t * K + k);
    for (int r = 0; r < RB; ++r) {
      const __m256 w = Load8<D>(rows[r], k);
      for (int t = 0; t < TB; ++t) acc[r][t] = _mm256_fmadd_ps(w, xv[t], acc[r][t]);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int t = 0; t < TB; ++t) {
      float s = HorizontalSum(acc[r][t]);
      for (int64_t k = K8; k < K; ++k) s += x[t * K + k] * ScalarLoad(rows[r], D, k);
      y[t * ldy + n0 + r] = s;
    }
  }
}

// Tokens [0, TB) against rows [row_begin, row_end), four rows at a time.
template <DType D, int TB>
inline void RowsForTokens(const float* x, int64_t K, const MatrixView& W, int64_t row_begin,
                          int64_t row_end, float* y, int64_t ldy) {
  constexpr int RB = TB <= 3 ? 4 : 2;
  int64_t n = row_begin;
  for (; n + RB <= row_end; n += RB) Tile<D, RB, TB>(x, K, W, n, y, ldy);
  for (; n < row_end; ++n) Tile<D, 1, TB>(x, K, W, n, y, ldy);
}

template <DType D>
void MatMulRowsTyped(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                     int64_t row_end, float* y, int64_t ldy) {
  const int64_t K = W.cols;
  // Walk a block of rows against every token group before moving on, so the block stays in
  // L1/L2 while it is reused (prefill); decode (T = 1) streams each row exactly once.
  constexpr int64_t kRowBlock = 16;
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
    const int64_t r1 = r0 + kRowBlock < row_end ? r0 + kRowBlock : row_end;
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) RowsForTokens<D, 4>(x + t * K, K, W, r0, r1, y + t * ldy, ldy);
    switch (T - t) {
      case 3: RowsForTokens<D, 3>(x + t * K, K, W, r0, r1, y + t * ldy, ldy); break;
      case 2: RowsForTokens<D, 2>(x + t * K, K, W, r0, r1, y + t * ldy, ldy); break;
      case 1: RowsForTokens<D, 1>(x + t * K, K, W, r0, r1, y + t * ldy, ldy); break;
      default: break;
    }
  }
}

void MatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                int64_t row_end, float* y, int64_t ldy) {
  switch (W.dtype) {
    case DType::kF32: return MatMulRowsTyped<DType::kF32>(x, T, W, row_begin, row_end, y, ldy);
    case DType::kBF16: return MatMulRowsTyped<DType::kBF16>(x, T, W, row_begin, row_end, y, ldy);
    case DType::kF16: return MatMulRowsTyped<DType::kF16>(x, T, W, row_begin, row_end, y, ldy);
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = HorizontalSum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

void Axpy(float a, const float* x, float* y, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) y[i] += a * x[i];
}

// e^x to within ~2 ulp on the range that matters (inputs clamped to ±88): 2^n · p(r) with
// r = x − n·ln2 split in two parts for accuracy, p a degree-6 minimax-style polynomial.
inline __m256 Exp(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 denom = _mm256_add_ps(one, Exp(_mm256_xor_ps(g, sign)));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, denom), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void RowToF32(const void* row, DType dtype, int64_t n, float* out) {
  int64_t i = 0;
  switch (dtype) {
    case DType::kF32:
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Load8<DType::kF32>(row, i));
      break;
    case DType::kBF16:
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Load8<DType::kBF16>(row, i));
      break;
    case DType::kF16:
      for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, Load8<DType::kF16>(row, i));
      break;
  }
  for (; i < n; ++i) out[i] = ScalarLoad(row, dtype, i);
}

}  // namespace

const KernelTable* Avx2Kernels() {
  static const KernelTable table{"avx2", MatMulRows, Dot, Axpy, SiluMul, RowToF32};
  return &table;
}

}  // namespace dsmoe::ops
