// AVX2 + FMA + F16C kernels. This file alone is compiled with -mavx2 -mfma -mf16c; nothing
// here runs unless GetCpuFeatures() said the CPU has them (ops/kernels.cc).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "core/ops/kernels.h"

namespace dsmoe::ops {
namespace {

// This file is compiled for AVX2, so it must not instantiate inline functions shared with
// other translation units (the linker could keep this AVX2 copy for a CPU without AVX2).
// Hence local, internal-linkage versions of the few helpers it needs.
inline const void* RowPtr(const MatrixView& W, int64_t r) {
  const size_t elem = W.dtype == DType::kF32                                ? 4
                      : (W.dtype == DType::kBF16 || W.dtype == DType::kF16) ? 2
                                                                            : 1;
  return static_cast<const char*>(W.data) + static_cast<size_t>(r * W.cols) * elem;
}
inline float ScalarLoad(const void* row, DType dtype, int64_t k) {
  if (dtype == DType::kF32) return static_cast<const float*>(row)[k];
  if (dtype == DType::kI8 || dtype == DType::kQ8_0)
    return static_cast<float>(static_cast<const int8_t*>(row)[k]);
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

// Few tokens (decode): one row at a time, so the weights are read as one sequential stream —
// on the reference machine a single stream reaches ~85% of the read bandwidth where four
// interleaved row streams reach ~60% — with UNROLL independent accumulators per token, TB·UNROLL
// ≥ 8 FMAs in flight per step: each accumulator is updated once per step, so fewer would leave
// the step bound by the 4-cycle FMA latency instead of the loads (T = 2 with 4 accumulators
// read 17 GB/s from L2; with 8, more than the memory can deliver). Two rows at a time, each
// activation vector then feeding two FMAs, was slower at 2–4 tokens too (bf16 weights from
// memory: 5.0–5.6 GB/s against 6.9–8.5): the second stream costs more than the loads it saves.
template <DType D, int TB>
inline void RowStream(const float* x, int64_t K, const MatrixView& W, int64_t row_begin,
                      int64_t row_end, float* y, int64_t ldy) {
  constexpr int UNROLL = TB == 1 ? 8 : TB == 2 ? 4 : 2;
  constexpr int64_t STEP = 8 * UNROLL;
  const int64_t Kmain = K / STEP * STEP;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const void* row = RowPtr(W, n);
    __m256 acc[TB][UNROLL];
    for (int t = 0; t < TB; ++t)
      for (int u = 0; u < UNROLL; ++u) acc[t][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < Kmain; k += STEP) {
      for (int u = 0; u < UNROLL; ++u) {
        const __m256 w = Load8<D>(row, k + 8 * u);
        for (int t = 0; t < TB; ++t)
          acc[t][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * K + k + 8 * u), acc[t][u]);
      }
    }
    int64_t k = Kmain;
    for (; k + 8 <= K; k += 8) {
      const __m256 w = Load8<D>(row, k);
      for (int t = 0; t < TB; ++t)
        acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + t * K + k), acc[t][0]);
    }
    for (int t = 0; t < TB; ++t) {
      __m256 sum = acc[t][0];
      for (int u = 1; u < UNROLL; ++u) sum = _mm256_add_ps(sum, acc[t][u]);
      float s = HorizontalSum(sum);
      for (int64_t kk = k; kk < K; ++kk) s += x[t * K + kk] * ScalarLoad(row, D, kk);
      y[t * ldy + n] = s;
    }
  }
}

// Prefill GEMM: a panel of 16 weight rows is converted once to fp32 and transposed into
// panel[k][16] (thread-local, L2-resident), then an MR-token × 16-feature register tile
// accumulates broadcast activations times panel vectors — 2·MR FMAs per 2 panel loads, no
// horizontal sums — the classic outer-product micro-kernel: 78 GFLOP/s on one core of the
// reference machine where the dot-product tiles reach 47.
constexpr int64_t kPanel = 16;

// Per-thread scratch, grown once. Plain malloc, not std::vector: this file is compiled for AVX2
// and must not instantiate library templates other files also use.
struct ScratchBuffer {
  float* data = nullptr;
  size_t capacity = 0;
  ~ScratchBuffer() { std::free(data); }
  float* Get(size_t floats) {
    if (capacity < floats) {
      std::free(data);
      data = static_cast<float*>(std::malloc(floats * sizeof(float)));
      capacity = floats;
    }
    return data;
  }
};

inline float* PanelScratch(size_t floats) {  // separate from Q8Scratch: Q8 batches use both
  thread_local ScratchBuffer buffer;
  return buffer.Get(floats);
}

template <DType D>
inline void PackPanel(const MatrixView& W, int64_t n0, int64_t K, float* panel) {
  alignas(32) float rows[kPanel][8];
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    for (int j = 0; j < kPanel; ++j) _mm256_store_ps(rows[j], Load8<D>(RowPtr(W, n0 + j), k));
    for (int kk = 0; kk < 8; ++kk)
      for (int j = 0; j < kPanel; ++j) panel[(k + kk) * kPanel + j] = rows[j][kk];
  }
  for (; k < K; ++k)
    for (int j = 0; j < kPanel; ++j) panel[k * kPanel + j] = ScalarLoad(RowPtr(W, n0 + j), D, k);
}

template <int MR>
inline void PanelTile(const float* x, int64_t K, const float* panel, float* y, int64_t ldy) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_load_ps(panel + k * kPanel),
                 b1 = _mm256_load_ps(panel + k * kPanel + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * K + k);
      acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(y + i * ldy, acc[i][0]);
    _mm256_storeu_ps(y + i * ldy + 8, acc[i][1]);
  }
}

template <DType D>
void PanelGemm(const float* x, int64_t T, const MatrixView& W, int64_t row_begin, int64_t row_end,
               float* y, int64_t ldy);

// Few tokens (a decode batch, an expert's share of a prompt chunk): the outer-product kernel
// with the roles turned around. The tokens are packed once per call into panels of up to 24,
// transposed (xt[k][w], w = 8·⌈n/8⌉, zero-padded); each group of 12 weight rows is widened to
// fp32 once into a buffer; the register tiles hold 12 accumulators whatever the panel's width —
// 12 rows × 1 vector of 8 tokens, 6 × 2 or 4 × 3 — each weight broadcast against the token
// vectors. Every weight byte is read from memory once per call, as in the decode row stream,
// while the FMAs run at the GEMM rate (fewer accumulators leave them waiting on their latency:
// 4 rows × 1 or 2 vectors ran at half the rate).
constexpr int64_t kTokenPanel = 24;  // 3 vectors: 12 accumulators + 3 tokens + 1 broadcast
constexpr int kRowGroup = 12;
// Widened rows lie K + 16 floats apart: rows of 1024 floats 4 KiB apart would all fall in one
// L1 set, and a tile reads 12 of them at once (8 ways: they evicted one another).
inline int64_t WidenedStride(int64_t K) { return K + 16; }

// Scratch for the packed tokens and the widened row group (separate from the other scratch
// buffers: a Q8_0 batch uses this and the panel scratch in one call).
inline float* TokenPanelScratch(size_t floats) {
  thread_local ScratchBuffer buffer;
  return buffer.Get(floats);
}

// In-register transpose of 8 vectors (rows) of 8 floats.
inline void Transpose8x8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]),
               t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]),
               t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]),
               t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

inline int64_t PanelWidth(int64_t T, int64_t p) {
  const int64_t n = T - p * kTokenPanel < kTokenPanel ? T - p * kTokenPanel : kTokenPanel;
  return (n + 7) / 8 * 8;
}

// x [T, K] → panels of kTokenPanel tokens at xt + p·kTokenPanel·K, each [K][PanelWidth].
inline void PackTokenPanels(const float* x, int64_t T, int64_t K, float* xt) {
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t t0 = 0; t0 < T; t0 += 8) {  // one group of 8 tokens at a time
    const int64_t p = t0 / kTokenPanel, w = PanelWidth(T, p);
    float* out = xt + p * kTokenPanel * K + (t0 - p * kTokenPanel);
    const int64_t valid = T - t0 < 8 ? T - t0 : 8;
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 r[8];
      for (int j = 0; j < 8; ++j)
        r[j] = j < valid ? _mm256_loadu_ps(x + (t0 + j) * K + k) : _mm256_setzero_ps();
      Transpose8x8(r);
      for (int j = 0; j < 8; ++j) _mm256_storeu_ps(out + (k + j) * w, r[j]);
    }
    for (int64_t k = K8; k < K; ++k)
      for (int j = 0; j < 8; ++j) out[k * w + j] = j < valid ? x[(t0 + j) * K + k] : 0.0f;
  }
}

// Row n of W as fp32 into out[0, K).
template <DType D>
inline void WidenRow(const MatrixView& W, int64_t n, float* out) {
  const int64_t K = W.cols;
  if constexpr (D == DType::kQ8_0) {
    const int8_t* q = static_cast<const int8_t*>(W.data) + n * K;
    const uint16_t* sc = W.scales + n * (K / kQ8Block);
    for (int64_t b = 0; b < K / kQ8Block; ++b) {
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(sc[b]));
      for (int j = 0; j < 4; ++j) {
        const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + b * kQ8Block + 8 * j))));
        _mm256_storeu_ps(out + b * kQ8Block + 8 * j, _mm256_mul_ps(v, d));
      }
    }
  } else {
    const void* row = RowPtr(W, n);
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(out + k, Load8<D>(row, k));
    for (; k < K; ++k) out[k] = ScalarLoad(row, D, k);
  }
}

// Weight bytes to bring into cache while a tile computes: the next row group's, spread over
// the tile's k loop (`stride` bytes further each k), so its widening finds them in cache
// instead of stalling on memory between two compute phases.
struct Prefetch {
  const char* begin;
  int64_t stride;  // 0: nothing to bring in (begin then points at data already in cache)
};

// RB widened rows (wf, stride K) × the NV token vectors of one panel (xt, width w = 8·NV).
// (The loops over r and v must be unrolled whole, or gcc keeps the accumulators in memory.)
template <int RB, int NV>
inline void BroadcastTile(const float* xt, int64_t K, const float* wf, float* y, int64_t ldy,
                          int64_t tokens, Prefetch pf) {
  __m256 acc[RB][NV];
#pragma GCC unroll 12
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  constexpr int64_t w = 8 * NV;
  const int64_t ldw = WidenedStride(K);
  const char* ahead = pf.begin;
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(ahead, _MM_HINT_T0);
    ahead += pf.stride;
    __m256 xv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) xv[v] = _mm256_loadu_ps(xt + k * w + 8 * v);
#pragma GCC unroll 12
    for (int r = 0; r < RB; ++r) {
      const __m256 b = _mm256_broadcast_ss(wf + r * ldw + k);
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(b, xv[v], acc[r][v]);
    }
  }
  // Whole-vector stores with constant indices first: a store of acc[r][v] inside a loop with a
  // runtime bound makes gcc keep the accumulators in memory and store them on every k.
  alignas(32) float tile[RB][NV][8];
#pragma GCC unroll 12
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm256_store_ps(tile[r][v], acc[r][v]);
  for (int64_t t = 0; t < tokens; ++t)
    for (int r = 0; r < RB; ++r) y[t * ldy + r] = tile[r][t / 8][t % 8];
}

template <int RB>
inline void BroadcastPanel(const float* xt, int64_t K, int64_t tokens, const float* wf, float* y,
                           int64_t ldy, Prefetch pf) {
  switch ((tokens + 7) / 8) {
    case 1:
      return BroadcastTile<RB, 1>(xt, K, wf, y, ldy, tokens, pf);
    case 2:
      return BroadcastTile<RB, 2>(xt, K, wf, y, ldy, tokens, pf);
    default:
      return BroadcastTile<RB, 3>(xt, K, wf, y, ldy, tokens, pf);
  }
}

// One widened row group (rb rows at wf) × one token panel. A whole group runs as tiles of 12
// accumulators; a last, partial group 4 rows at a time. Only the first tile prefetches `pf`.
inline void GroupPanel(const float* xt, int64_t K, int64_t tokens, int64_t rb, const float* wf,
                       float* y, int64_t ldy, Prefetch pf) {
  const Prefetch cached{reinterpret_cast<const char*>(wf), 0};
  const int64_t ldw = WidenedStride(K);
  if (rb == kRowGroup) {
    switch ((tokens + 7) / 8) {
      case 1:
        return BroadcastTile<12, 1>(xt, K, wf, y, ldy, tokens, pf);
      case 2:
        BroadcastTile<6, 2>(xt, K, wf, y, ldy, tokens, pf);
        return BroadcastTile<6, 2>(xt, K, wf + 6 * ldw, y + 6, ldy, tokens, cached);
      default:
        BroadcastTile<4, 3>(xt, K, wf, y, ldy, tokens, pf);
        BroadcastTile<4, 3>(xt, K, wf + 4 * ldw, y + 4, ldy, tokens, cached);
        return BroadcastTile<4, 3>(xt, K, wf + 8 * ldw, y + 8, ldy, tokens, cached);
    }
  }
  using PanelFn = void (*)(const float*, int64_t, int64_t, const float*, float*, int64_t, Prefetch);
  static constexpr PanelFn kPanels[] = {BroadcastPanel<1>, BroadcastPanel<2>, BroadcastPanel<3>,
                                        BroadcastPanel<4>};
  for (int64_t r = 0; r < rb; r += 4) {
    const int64_t n = rb - r < 4 ? rb - r : 4;
    kPanels[n - 1](xt, K, tokens, wf + r * ldw, y + r, ldy, r == 0 ? pf : cached);
  }
}

constexpr int64_t kPanelGemmMinTokens = 48;

template <DType D>
void SmallBatchGemm(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                    int64_t row_end, float* y, int64_t ldy) {
  const int64_t K = W.cols, panels = (T + kTokenPanel - 1) / kTokenPanel;
  float* xt = TokenPanelScratch(
      static_cast<size_t>(panels * kTokenPanel * K + kRowGroup * WidenedStride(K)));
  float* wf = xt + panels * kTokenPanel * K;
  PackTokenPanels(x, T, K, xt);
  // Bytes of one row (Q8_0: its int8 values; the scales are few and follow their own stream).
  const int64_t row_bytes = K * (D == DType::kF32 ? 4 : D == DType::kQ8_0 ? 1 : 2);
  for (int64_t n0 = row_begin; n0 < row_end; n0 += kRowGroup) {
    const int64_t rb = row_end - n0 < kRowGroup ? row_end - n0 : kRowGroup;
    for (int64_t r = 0; r < rb; ++r) WidenRow<D>(W, n0 + r, wf + r * WidenedStride(K));
    const int64_t next = row_end - (n0 + rb) < kRowGroup ? row_end - (n0 + rb) : kRowGroup;
    Prefetch pf{static_cast<const char*>(W.data) + (n0 + rb) * row_bytes,
                (next * row_bytes + K - 1) / K};
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t tokens = T - p * kTokenPanel < kTokenPanel ? T - p * kTokenPanel : kTokenPanel;
      const float* panel = xt + p * kTokenPanel * K;
      float* yp = y + p * kTokenPanel * ldy + n0;
      GroupPanel(panel, K, tokens, rb, wf, yp, ldy, pf);
      pf = {reinterpret_cast<const char*>(wf), 0};  // the first panel brought them in
    }
  }
}

template <DType D>
void MatMulRowsTyped(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                     int64_t row_end, float* y, int64_t ldy) {
  const int64_t K = W.cols;
  switch (T) {  // up to 4 tokens the row stream beats the broadcast tiles (8-token vectors)
    case 1:
      return RowStream<D, 1>(x, K, W, row_begin, row_end, y, ldy);
    case 2:
      return RowStream<D, 2>(x, K, W, row_begin, row_end, y, ldy);
    case 3:
      return RowStream<D, 3>(x, K, W, row_begin, row_end, y, ldy);
    case 4:
      return RowStream<D, 4>(x, K, W, row_begin, row_end, y, ldy);
    default:
      break;
  }
  // Packing a weight panel (a scalar transposition) pays for itself over a prompt chunk's
  // tokens, not over an expert's few.
  if (T < kPanelGemmMinTokens || row_end - row_begin < kPanel)
    return SmallBatchGemm<D>(x, T, W, row_begin, row_end, y, ldy);
  return PanelGemm<D>(x, T, W, row_begin, row_end, y, ldy);
}

template <DType D>
void PanelGemm(const float* x, int64_t T, const MatrixView& W, int64_t row_begin, int64_t row_end,
               float* y, int64_t ldy) {
  const int64_t K = W.cols;
  constexpr int MR =
      4;  // 8 accumulators + 2 panel vectors + a broadcast: no spills (6 spills on gcc 12)
  // Blocking: 8 panels (128 rows) are packed once, then swept by blocks of 64 tokens, so the
  // tokens' activations (64 × K floats) stay in L2 across the panels instead of streaming
  // from memory once per panel.
  constexpr int64_t kPanelsPerBlock = 8, kTokenBlock = 64;
  float* packed = PanelScratch(static_cast<size_t>(kPanelsPerBlock * kPanel * K) + 8);
  packed = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(packed) + 31) & ~uintptr_t{31});
  int64_t n = row_begin;
  while (n + kPanel <= row_end) {
    const int64_t fit = (row_end - n) / kPanel;
    const int64_t panels = fit < kPanelsPerBlock ? fit : kPanelsPerBlock;
    for (int64_t p = 0; p < panels; ++p)
      PackPanel<D>(W, n + p * kPanel, K, packed + p * kPanel * K);
    for (int64_t t0 = 0; t0 < T; t0 += kTokenBlock) {
      const int64_t t1 = t0 + kTokenBlock < T ? t0 + kTokenBlock : T;
      for (int64_t p = 0; p < panels; ++p) {
        const float* panel = packed + p * kPanel * K;
        float* yp = y + n + p * kPanel;
        int64_t t = t0;
        for (; t + MR <= t1; t += MR) PanelTile<MR>(x + t * K, K, panel, yp + t * ldy, ldy);
        switch (t1 - t) {
          case 3:
            PanelTile<3>(x + t * K, K, panel, yp + t * ldy, ldy);
            break;
          case 2:
            PanelTile<2>(x + t * K, K, panel, yp + t * ldy, ldy);
            break;
          case 1:
            PanelTile<1>(x + t * K, K, panel, yp + t * ldy, ldy);
            break;
          default:
            break;
        }
      }
    }
    n += panels * kPanel;
  }
  if (n < row_end) SmallBatchGemm<D>(x, T, W, n, row_end, y, ldy);  // < 16 rows left
}

// Q8_0 rows: 32 int8 weights and one F16 scale per block. Per token, each block's products
// are summed unscaled (the int8 → fp32 widening is exact), then scaled once: acc += d · Σ q·x.
// Four rows at a time share each activation load.
inline __m256 Int8ToF32(const int8_t* q) {
  return _mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}

// Per-thread scratch for dequantized rows and quantized activations.
inline float* Q8Scratch(size_t floats) {
  thread_local ScratchBuffer buffer;
  return buffer.Get(floats);
}

// One token's activations in 16-bit fixed point per block of 32 (x ≈ x16 · sx, relative error
// ≤ 2^-16 of the block's largest value): int8 weights then multiply them with integer
// multiply-adds, which do far more per cycle than widening every weight to fp32.
inline void QuantizeActivationsQ16(const float* x, int64_t K, int16_t* x16, float* sx) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t b = 0; b < K / kQ8Block; ++b) {
    const float* xb = x + b * kQ8Block;
    __m256 m = _mm256_andnot_ps(sign, _mm256_loadu_ps(xb));
    for (int j = 1; j < 4; ++j)
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + 8 * j)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float scale = amax / 32767.0f;
    sx[b] = scale;
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    for (int j = 0; j < 4; j += 2) {
      const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), inv));
      const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j + 8), inv));
      // packs interleaves 128-bit lanes; the permute puts the 16 values back in order.
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x16 + b * kQ8Block + 8 * j), packed);
    }
  }
}

// One Q8_0 row against TB tokens' 16-bit activations (x16/sx: token t at t·K and t·K/32):
// each block of 32 weights is loaded and widened once for all tokens. Blocks alternate between
// two accumulators per token, so the FMA latency chain does not bound the stream.
template <int TB>
inline void Q8RowStream(const int16_t* x16, const float* sx, int64_t K, const MatrixView& W,
                        int64_t n, float* y, int64_t ldy) {
  const int8_t* row = static_cast<const int8_t*>(W.data) + n * K;
  const uint16_t* scales = W.scales + n * (K / kQ8Block);
  const int64_t blocks = K / kQ8Block;
  __m256 acc[TB][2];
  for (int t = 0; t < TB; ++t) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
  auto block = [&](int64_t b, int parity, const __m256* c) {
    const __m256i wa =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kQ8Block)));
    const __m256i wb = _mm256_cvtepi8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kQ8Block + 16)));
    for (int t = 0; t < TB; ++t) {
      const int16_t* xt = x16 + t * K + b * kQ8Block;
      const __m256i dot = _mm256_add_epi32(
          _mm256_madd_epi16(wa, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt))),
          _mm256_madd_epi16(wb, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 16))));
      acc[t][parity] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), c[t], acc[t][parity]);
    }
  };
  int64_t b = 0;
  // Eight blocks at a time: eight weight scales (F16) times each token's eight activation
  // scales make one vector per token, and each block's is broadcast from it by a lane permute.
  for (; b + 8 <= blocks; b += 8) {
    const __m256 w8 =
        _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + b)));
    __m256 c8[TB];
    for (int t = 0; t < TB; ++t) c8[t] = _mm256_mul_ps(w8, _mm256_loadu_ps(sx + t * blocks + b));
    for (int j = 0; j < 8; ++j) {
      __m256 c[TB];
      const __m256i lane = _mm256_set1_epi32(j);
      for (int t = 0; t < TB; ++t) c[t] = _mm256_permutevar8x32_ps(c8[t], lane);
      block(b + j, j & 1, c);
    }
  }
  for (; b < blocks; ++b) {
    __m256 c[TB];
    for (int t = 0; t < TB; ++t) c[t] = _mm256_set1_ps(_cvtsh_ss(scales[b]) * sx[t * blocks + b]);
    block(b, 0, c);
  }
  for (int t = 0; t < TB; ++t) y[t * ldy + n] = HorizontalSum(_mm256_add_ps(acc[t][0], acc[t][1]));
}

// Dequantizes rows [r0, r1) of a Q8_0 matrix to fp32 `out` ([r1 - r0, K]).
inline void DequantizeQ8Rows(const MatrixView& W, int64_t r0, int64_t r1, float* out) {
  const int64_t K = W.cols;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* q = static_cast<const int8_t*>(W.data) + r * K;
    const uint16_t* sc = W.scales + r * (K / kQ8Block);
    float* o = out + (r - r0) * K;
    for (int64_t b = 0; b < K / kQ8Block; ++b) {
      const __m256 d = _mm256_set1_ps(_cvtsh_ss(sc[b]));
      for (int j = 0; j < 4; ++j) {
        _mm256_storeu_ps(o + b * kQ8Block + 8 * j,
                         _mm256_mul_ps(Int8ToF32(q + b * kQ8Block + 8 * j), d));
      }
    }
  }
}

void MatMulRowsQ8(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                  int64_t row_end, float* y, int64_t ldy) {
  const int64_t K = W.cols;
  if (T <= 4) {  // decode: stream the int8 rows once, straight from memory, for all the tokens
    const int64_t blocks = K / kQ8Block;
    // x16 takes T·K int16 (T·K/2 floats of room), sx T·blocks floats after it.
    float* scratch = Q8Scratch(static_cast<size_t>(T * (K + blocks)));
    int16_t* x16 = reinterpret_cast<int16_t*>(scratch);
    float* sx = scratch + T * K;
    for (int64_t t = 0; t < T; ++t)
      QuantizeActivationsQ16(x + t * K, K, x16 + t * K, sx + t * blocks);
    using RowStreamFn = void (*)(const int16_t*, const float*, int64_t, const MatrixView&, int64_t,
                                 float*, int64_t);
    static constexpr RowStreamFn kStreams[] = {Q8RowStream<1>, Q8RowStream<2>, Q8RowStream<3>,
                                               Q8RowStream<4>};
    for (int64_t n = row_begin; n < row_end; ++n) kStreams[T - 1](x16, sx, K, W, n, y, ldy);
    return;
  }
  if (T < kPanelGemmMinTokens)
    return SmallBatchGemm<DType::kQ8_0>(x, T, W, row_begin, row_end, y, ldy);
  // Prompt chunks: dequantize a block of rows once (thread-local scratch, grown once), then run
  // the fp32 panel GEMM over every token.
  constexpr int64_t kRowBlock = 16;
  float* scratch = Q8Scratch(static_cast<size_t>(kRowBlock * K));
  for (int64_t r0 = row_begin; r0 < row_end; r0 += kRowBlock) {
    const int64_t r1 = r0 + kRowBlock < row_end ? r0 + kRowBlock : row_end;
    DequantizeQ8Rows(W, r0, r1, scratch);
    const MatrixView block{DType::kF32, r1 - r0, K, scratch, nullptr};
    MatMulRowsTyped<DType::kF32>(x, T, block, 0, r1 - r0, y + r0, ldy);
  }
}

void MatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin, int64_t row_end,
                float* y, int64_t ldy) {
  switch (W.dtype) {
    case DType::kQ8_0:
      return MatMulRowsQ8(x, T, W, row_begin, row_end, y, ldy);
    case DType::kI8:
      return;  // not a weight format: Q8_0 carries its scales
    case DType::kF32:
      return MatMulRowsTyped<DType::kF32>(x, T, W, row_begin, row_end, y, ldy);
    case DType::kBF16:
      return MatMulRowsTyped<DType::kBF16>(x, T, W, row_begin, row_end, y, ldy);
    case DType::kF16:
      return MatMulRowsTyped<DType::kF16>(x, T, W, row_begin, row_end, y, ldy);
  }
}

float Dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8)
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
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
  const __m256i e =
      _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
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
    case DType::kI8:
    case DType::kQ8_0:
      break;  // rows of these need their scales: the scalar tail below handles kI8 only
  }
  for (; i < n; ++i) out[i] = ScalarLoad(row, dtype, i);
}

// The cache's element type for a KvPages dtype: fp32 rows, or bf16 rows widened in registers.
template <DType D>
using KvElem = std::conditional_t<D == DType::kF32, float, uint16_t>;

// Element k of a row, in all eight lanes, as fp32. BF16: the 16 bits in every 16-bit lane,
// shifted into the top half of each 32-bit lane (which drops the low copy): bf16 -> fp32.
template <DType D>
inline __m256 Broadcast1(const void* row, int64_t k) {
  if constexpr (D == DType::kF32) {
    return _mm256_broadcast_ss(static_cast<const float*>(row) + k);
  } else {
    const __m256i h = _mm256_set1_epi16(static_cast<const int16_t*>(row)[k]);
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
  }
}

// Σ_p s[p] · V[p][d0, d0 + 8·NV) into out (NV ≤ 8 vectors in registers across all positions),
// a page's run of rows at a time.
template <int NV, DType D>
inline void WeightedValueSum(const float* s, const KvPages& kv, int64_t d0, int64_t len,
                             float* out) {
  __m256 acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = _mm256_setzero_ps();
  const int64_t stride = kv.stride;
  for (int64_t p0 = 0; p0 < len;) {
    const int64_t n = kv.RunFrom(p0, len);
    const KvElem<D>* values = kv.Value<KvElem<D>>(p0) + d0;
    for (int64_t j = 0; j < n; ++j) {
      const __m256 b = _mm256_broadcast_ss(s + p0 + j);
      for (int v = 0; v < NV; ++v)
        acc[v] = _mm256_fmadd_ps(b, Load8<D>(values + j * stride, 8 * v), acc[v]);
    }
    p0 += n;
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + 8 * v, acc[v]);
}

// Fused single-query attention: four key rows per pass share each query load and one
// horizontal-add tree; the softmax runs on vectors; the weighted value sum keeps up to 64 output
// dimensions in registers across all positions (instead of a function call per position).
// BF16 pages are read as they are, each 8 elements widened in a register (Load8).
template <DType D>
void Attend(const float* q, const KvPages& kv, int64_t len, int64_t hd, float scale, float* s_all,
            float* out) {
  using E = KvElem<D>;
  const int64_t hd8 = hd & ~int64_t{7};
  const int64_t stride = kv.stride;
  auto tail_dot = [&](const E* key) {
    float t = 0.0f;
    for (int64_t d = hd8; d < hd; ++d) t += q[d] * ScalarLoad(key, D, d);
    return t;
  };
  // Scores, one page's run of rows at a time (the whole cache when it is contiguous).
  for (int64_t p0 = 0; p0 < len;) {
    const int64_t run = kv.RunFrom(p0, len);
    const E* keys = kv.Key<E>(p0);
    float* s = s_all + p0;
    int64_t p = 0;
    for (; p + 4 <= run; p += 4) {
      const E* k0 = keys + p * stride;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t d = 0; d < hd8; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(Load8<D>(k0, d), qv, a0);
        a1 = _mm256_fmadd_ps(Load8<D>(k0 + stride, d), qv, a1);
        a2 = _mm256_fmadd_ps(Load8<D>(k0 + 2 * stride, d), qv, a2);
        a3 = _mm256_fmadd_ps(Load8<D>(k0 + 3 * stride, d), qv, a3);
      }
      // Lanes of hadd(hadd(a0, a1), hadd(a2, a3)): per 128-bit half, the four partial sums.
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      __m128 dots = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
      if (hd8 < hd) {
        dots = _mm_add_ps(dots, _mm_setr_ps(tail_dot(k0), tail_dot(k0 + stride),
                                            tail_dot(k0 + 2 * stride), tail_dot(k0 + 3 * stride)));
      }
      _mm_storeu_ps(s + p, _mm_mul_ps(dots, _mm_set1_ps(scale)));
    }
    for (; p < run; ++p) {
      const E* key = keys + p * stride;
      float dot;
      if constexpr (D == DType::kF32) {
        dot = Dot(q, key, hd8);
      } else {
        __m256 a = _mm256_setzero_ps();
        for (int64_t d = 0; d < hd8; d += 8)
          a = _mm256_fmadd_ps(Load8<D>(key, d), _mm256_loadu_ps(q + d), a);
        dot = HorizontalSum(a);
      }
      s[p] = (dot + tail_dot(key)) * scale;
    }
    p0 += run;
  }

  // Softmax over the scores.
  float* s = s_all;
  int64_t p = 0;
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  for (; p + 8 <= len; p += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + p));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float max = lanes[0];
  for (int i = 1; i < 8; ++i) max = lanes[i] > max ? lanes[i] : max;
  for (; p < len; ++p) max = s[p] > max ? s[p] : max;
  const __m256 m = _mm256_set1_ps(max);
  __m256 vsum = _mm256_setzero_ps();
  p = 0;
  for (; p + 8 <= len; p += 8) {
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(s + p), m));
    _mm256_storeu_ps(s + p, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = HorizontalSum(vsum);
  for (; p < len; ++p) sum += s[p] = std::exp(s[p] - max);
  const float inv = 1.0f / sum;

  // out = Σ_p s[p] · V[p] / sum, 64 dimensions at a time.
  using ValueSum = void (*)(const float*, const KvPages&, int64_t, int64_t, float*);
  static constexpr ValueSum kValueSums[] = {WeightedValueSum<1, D>, WeightedValueSum<2, D>,
                                            WeightedValueSum<3, D>, WeightedValueSum<4, D>,
                                            WeightedValueSum<5, D>, WeightedValueSum<6, D>,
                                            WeightedValueSum<7, D>, WeightedValueSum<8, D>};
  for (int64_t d0 = 0; d0 < hd8; d0 += 64)
    kValueSums[(hd8 - d0 < 64 ? hd8 - d0 : 64) / 8 - 1](s, kv, d0, len, out + d0);
  for (int64_t d = hd8; d < hd; ++d) {
    float t = 0.0f;
    for (int64_t pp = 0; pp < len; ++pp) t += s[pp] * ScalarLoad(kv.Value<E>(pp), D, d);
    out[d] = t;
  }
  const __m256 vinv = _mm256_set1_ps(inv);
  int64_t d = 0;
  for (; d + 8 <= hd; d += 8)
    _mm256_storeu_ps(out + d, _mm256_mul_ps(_mm256_loadu_ps(out + d), vinv));
  for (; d < hd; ++d) out[d] *= inv;
}

// Eight queries at once, one per vector lane: scores s[p] (8 lanes) = Σ_d qt[d] · K[p][d] with
// the queries packed transposed (qt[d][8]) and each key element broadcast, four keys per pass;
// the softmax then runs on whole vectors (each lane its own query), and the output is built
// transposed, ot[d][8] = Σ_p s[p] · V[p][d], eight dimensions per pass, then turned back. Each
// cached row is read once for the eight queries instead of once per query. BF16 keys are
// widened as they are broadcast (Broadcast1), BF16 values as each chunk is gathered.
template <DType D>
void AttendCausalBlock(const float* q, int64_t q_stride, int64_t Q, int64_t first,
                       const KvPages& kv, int64_t hd, float scale, float* scratch, float* out,
                       int64_t out_stride) {
  using E = KvElem<D>;
  const int64_t stride = kv.stride;
  const int64_t len = first + Q;  // positions the last query sees
  float* qt = scratch;            // [hd][8]
  float* s = scratch + hd * 8;    // [len][8], then the output sums and a chunk of values
  for (int64_t d = 0; d < hd; ++d)
    for (int64_t i = 0; i < 8; ++i) qt[d * 8 + i] = i < Q ? q[i * q_stride + d] : 0.0f;

  // Eight keys per pass: eight independent FMA chains, as many as the 4-cycle FMA latency needs
  // to keep both FMA units busy (four left the pass latency-bound at half that rate).
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t p = 0;
  // One page's run of rows at a time (the whole cache when it is contiguous).
  for (int64_t p0 = 0; p0 < len;) {
    const int64_t run_end = p0 + kv.RunFrom(p0, len);
    const E* keys = kv.Key<E>(p0);  // row p of the run at keys + (p - p0) · stride
    for (p = p0; p + 8 <= run_end; p += 8) {
      const E* k0 = keys + (p - p0) * stride;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
             a7 = a0;
      for (int64_t d = 0; d < hd; ++d) {
        const __m256 qv = _mm256_loadu_ps(qt + d * 8);
        a0 = _mm256_fmadd_ps(Broadcast1<D>(k0, d), qv, a0);
        a1 = _mm256_fmadd_ps(Broadcast1<D>(k0 + stride, d), qv, a1);
        a2 = _mm256_fmadd_ps(Broadcast1<D>(k0 + 2 * stride, d), qv, a2);
        a3 = _mm256_fmadd_ps(Broadcast1<D>(k0 + 3 * stride, d), qv, a3);
        a4 = _mm256_fmadd_ps(Broadcast1<D>(k0 + 4 * stride, d), qv, a4);
        a5 = _mm256_fmadd_ps(Broadcast1<D>(k0 + 5 * stride, d), qv, a5);
        a6 = _mm256_fmadd_ps(Broadcast1<D>(k0 + 6 * stride, d), qv, a6);
        a7 = _mm256_fmadd_ps(Broadcast1<D>(k0 + 7 * stride, d), qv, a7);
      }
      _mm256_storeu_ps(s + p * 8, _mm256_mul_ps(a0, sc));
      _mm256_storeu_ps(s + (p + 1) * 8, _mm256_mul_ps(a1, sc));
      _mm256_storeu_ps(s + (p + 2) * 8, _mm256_mul_ps(a2, sc));
      _mm256_storeu_ps(s + (p + 3) * 8, _mm256_mul_ps(a3, sc));
      _mm256_storeu_ps(s + (p + 4) * 8, _mm256_mul_ps(a4, sc));
      _mm256_storeu_ps(s + (p + 5) * 8, _mm256_mul_ps(a5, sc));
      _mm256_storeu_ps(s + (p + 6) * 8, _mm256_mul_ps(a6, sc));
      _mm256_storeu_ps(s + (p + 7) * 8, _mm256_mul_ps(a7, sc));
    }
    for (; p < run_end; ++p) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; ++d)
        a = _mm256_fmadd_ps(Broadcast1<D>(keys + (p - p0) * stride, d), _mm256_loadu_ps(qt + d * 8),
                            a);
      _mm256_storeu_ps(s + p * 8, _mm256_mul_ps(a, sc));
    }
    p0 = run_end;
  }
  // Causal mask: query i does not see positions after first + i (only the last Q rows).
  for (int64_t pp = first + 1; pp < len; ++pp)
    for (int64_t i = 0; i < pp - first; ++i) s[pp * 8 + i] = -INFINITY;

  __m256 m = _mm256_set1_ps(-INFINITY);
  for (p = 0; p < len; ++p) m = _mm256_max_ps(m, _mm256_loadu_ps(s + p * 8));
  // Value rows are hd floats each, one cache row apart (other heads between): fetch a chunk's
  // rows ahead of the pass that needs them, or every first touch waits on a far cache.
  constexpr int64_t kChunk = 64;
  const int64_t row_bytes = hd * static_cast<int64_t>(sizeof(E));
  auto prefetch_values = [&](int64_t row) {
    const char* v = reinterpret_cast<const char*>(kv.Value<E>(row));
    for (int64_t b = 0; b < row_bytes; b += 64) _mm_prefetch(v + b, _MM_HINT_T0);
  };
  __m256 sum = _mm256_setzero_ps();
  for (p = 0; p < len; ++p) {
    if (p < kChunk) prefetch_values(p);
    const __m256 e = Exp(_mm256_sub_ps(_mm256_loadu_ps(s + p * 8), m));
    _mm256_storeu_ps(s + p * 8, e);
    sum = _mm256_add_ps(sum, e);
  }
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(1.0f), sum);

  // Positions in chunks of 64 whose value rows are first copied next to each other: each group
  // of 8 dimensions then passes over the chunk in L1. In the cache the rows lie a multiple of
  // 4 KiB apart (one cache row), so they all fall in the same L1 set and evict one another; and
  // one pass over all positions per group would fetch every row hd/8 times from far caches.
  // The running sums wait in `ot` between chunks.
  float* ot = s + len * 8;     // [hd][8]: output dimension d for the 8 queries
  float* chunk = ot + hd * 8;  // [kChunk][hd]: the chunk's value rows, contiguous
  for (int64_t i = 0; i < hd * 8; ++i) ot[i] = 0.0f;
  for (int64_t p0 = 0; p0 < len; p0 += kChunk) {
    const int64_t p1 = p0 + kChunk < len ? p0 + kChunk : len;
    for (p = p0; p < p1; ++p) {
      const E* v = kv.Value<E>(p);
      for (int64_t d = 0; d < hd; d += 8)
        _mm256_storeu_ps(chunk + (p - p0) * hd + d, Load8<D>(v, d));
    }
    for (int64_t d0 = 0; d0 < hd; d0 += 8) {
      __m256 a0 = _mm256_loadu_ps(ot + d0 * 8), a1 = _mm256_loadu_ps(ot + (d0 + 1) * 8),
             a2 = _mm256_loadu_ps(ot + (d0 + 2) * 8), a3 = _mm256_loadu_ps(ot + (d0 + 3) * 8),
             a4 = _mm256_loadu_ps(ot + (d0 + 4) * 8), a5 = _mm256_loadu_ps(ot + (d0 + 5) * 8),
             a6 = _mm256_loadu_ps(ot + (d0 + 6) * 8), a7 = _mm256_loadu_ps(ot + (d0 + 7) * 8);
      for (p = p0; p < p1; ++p) {
        // The next chunk's rows, one per position of the first pass: spread out, so the
        // prefetches do not overflow the queue of misses in flight and get dropped.
        if (d0 == 0 && p + kChunk < len) prefetch_values(p + kChunk);
        const __m256 w = _mm256_loadu_ps(s + p * 8);
        const float* v = chunk + (p - p0) * hd + d0;
        a0 = _mm256_fmadd_ps(_mm256_broadcast_ss(v), w, a0);
        a1 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 1), w, a1);
        a2 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 2), w, a2);
        a3 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 3), w, a3);
        a4 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 4), w, a4);
        a5 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 5), w, a5);
        a6 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 6), w, a6);
        a7 = _mm256_fmadd_ps(_mm256_broadcast_ss(v + 7), w, a7);
      }
      _mm256_storeu_ps(ot + d0 * 8, a0);
      _mm256_storeu_ps(ot + (d0 + 1) * 8, a1);
      _mm256_storeu_ps(ot + (d0 + 2) * 8, a2);
      _mm256_storeu_ps(ot + (d0 + 3) * 8, a3);
      _mm256_storeu_ps(ot + (d0 + 4) * 8, a4);
      _mm256_storeu_ps(ot + (d0 + 5) * 8, a5);
      _mm256_storeu_ps(ot + (d0 + 6) * 8, a6);
      _mm256_storeu_ps(ot + (d0 + 7) * 8, a7);
    }
  }
  for (int64_t d0 = 0; d0 < hd; d0 += 8) {
    __m256 block[8];
    for (int j = 0; j < 8; ++j) block[j] = _mm256_mul_ps(_mm256_loadu_ps(ot + (d0 + j) * 8), inv);
    Transpose8x8(block);  // block[i] = query i's dimensions d0 .. d0 + 7
    for (int64_t i = 0; i < Q; ++i) _mm256_storeu_ps(out + i * out_stride + d0, block[i]);
  }
}

template <DType D>
void AttendCausalTyped(const float* q, int64_t q_stride, int64_t Q, int64_t first,
                       const KvPages& kv, int64_t hd, float scale, float* scratch, float* out,
                       int64_t out_stride) {
  for (int64_t i0 = 0; i0 < Q; i0 += 8) {
    const int64_t n = Q - i0 < 8 ? Q - i0 : 8;
    if (n == 1 || hd % 8 != 0) {  // one query, or a head the 8-wide transposes do not fit
      for (int64_t i = i0; i < i0 + n; ++i) {
        Attend<D>(q + i * q_stride, kv, first + i + 1, hd, scale, scratch, out + i * out_stride);
      }
      continue;
    }
    AttendCausalBlock<D>(q + i0 * q_stride, q_stride, n, first + i0, kv, hd, scale, scratch,
                         out + i0 * out_stride, out_stride);
  }
}

// The table's entries: one instantiation per KV dtype.
void AttendAny(const float* q, const KvPages& kv, int64_t len, int64_t hd, float scale,
               float* scores, float* out) {
  if (kv.dtype == DType::kBF16) return Attend<DType::kBF16>(q, kv, len, hd, scale, scores, out);
  Attend<DType::kF32>(q, kv, len, hd, scale, scores, out);
}

void AttendCausal(const float* q, int64_t q_stride, int64_t Q, int64_t first, const KvPages& kv,
                  int64_t hd, float scale, float* scratch, float* out, int64_t out_stride) {
  if (kv.dtype == DType::kBF16) {
    return AttendCausalTyped<DType::kBF16>(q, q_stride, Q, first, kv, hd, scale, scratch, out,
                                           out_stride);
  }
  AttendCausalTyped<DType::kF32>(q, q_stride, Q, first, kv, hd, scale, scratch, out, out_stride);
}

}  // namespace

const KernelTable* Avx2Kernels() {
  static const KernelTable table{"avx2",  MatMulRows, Dot,       Axpy,
                                 SiluMul, RowToF32,   AttendAny, AttendCausal};
  return &table;
}

}  // namespace dsmoe::ops
