// AVX-512 kernels: F/BW/VL for 16-float vectors and masked tails, VNNI for Q8_0, BF16 for
// `vdpbf16ps`. This file alone is compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
// -mavx512bf16 -mfma -mf16c; nothing here runs unless GetCpuFeatures().HasAvx512Kernels()
// (ops/kernels.cc).
//
// The paths follow avx2_kernels.cc (its comments give the measurements behind each choice), at
// twice the width:
//   - decode (≤ 4 tokens, memory-bound): one weight row at a time as one sequential stream,
//     widened to fp32 in zmm registers; Q8_0 keeps the AVX2 path's 16-bit activations, one
//     `vpdpwssd` per block of 32 weights and token;
//   - 5–8 tokens: the AVX2 kernel (its 8-token vectors fit; 16-token ones would be half empty);
//   - batches and prompts (≥ 9 tokens): the tokens packed transposed into panels of up to 48
//     (3 zmm), weight rows in groups of 16 widened to fp32 once per token block, register tiles
//     of broadcast weights × token vectors (up to 24 accumulators of the 32 registers);
//   - Q8_0 from kQ8PairMinTokens tokens on: the activations rounded to 16 bits per block as in
//     decode and packed in pairs, the weights widened to int16 (exact), `vpdpwssd` adding two
//     products per lane into a block's int32 sums, scaled into fp32 at the block's end
//     (numerics: KernelTable::q8_activation_min_tokens);
//   - in the "avx512bf16" table, BF16 from kBf16PairMinTokens tokens on: the activations
//     rounded to BF16 and packed in pairs along k, the raw BF16 weight pairs broadcast into
//     `vdpbf16ps` — no widening, two products per lane per instruction (numerics:
//     KernelTable::bf16_activation_min_tokens). The "avx512" table widens BF16 to fp32 instead:
//     on the Xeon this was written on (Sapphire Rapids or later: it has AMX) the `vdpbf16ps`
//     tiles ran at 95 GFLOP per CPU-second where the fp32 tiles ran at 123 (one core,
//     [2048, 2048] × 512 tokens); a register-only loop there issues 1.6 G `vdpbf16ps`/s against
//     2.3 G FMAs/s (and 2.3 G `vpdpwssd`/s, hence the Q8_0 pairs above). On Zen 4, whose
//     512-bit FMAs are double-pumped, it should be the faster way (llama.cpp relies on it
//     there; not measured here): ops/kernels.cc prefers "avx512bf16" on AMD CPUs, and
//     bench_kernels prints both;
//   - attention: the AVX2 functions (the KV cache's layout is being changed; not widened yet).
#include <immintrin.h>

// gcc 12 warns that its own AVX-512 intrinsics read an uninitialised value (the
// _mm512_undefined_* placeholders some of them pass through): a false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/ops/kernels.h"

namespace dsmoe::ops {
namespace {

// Like avx2_kernels.cc, this file must not instantiate inline functions or templates shared
// with other translation units (the linker could keep this AVX-512 copy for a CPU without it),
// hence its own small helpers and plain malloc scratch.
inline const void* RowPtr(const MatrixView& W, int64_t r) {
  const size_t elem = W.dtype == DType::kF32                                ? 4
                      : (W.dtype == DType::kBF16 || W.dtype == DType::kF16) ? 2
                                                                            : 1;
  return static_cast<const char*>(W.data) + static_cast<size_t>(r * W.cols) * elem;
}

// Lanes [0, n) of 16 (all of them when n ≥ 16).
inline __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << n) - 1);
}

// Sixteen weights of a row from element k as fp32; the masked form reads only lanes in `m`
// (masked-off lanes are zero and never touch memory, so a row's tail needs no scalar loop).
template <DType D>
inline __m512 Widen16(__m256i h) {
  if constexpr (D == DType::kBF16) {  // bf16 is the top half of an fp32
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else {
    return _mm512_cvtph_ps(h);
  }
}
template <DType D>
inline __m512 Load16(const void* row, int64_t k) {
  if constexpr (D == DType::kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(row) + k);
  } else {
    return Widen16<D>(_mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(row) + k)));
  }
}
template <DType D>
inline __m512 Load16(const void* row, int64_t k, __mmask16 m) {
  if constexpr (D == DType::kF32) {
    return _mm512_maskz_loadu_ps(m, static_cast<const float*>(row) + k);
  } else {
    return Widen16<D>(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + k));
  }
}

// Per-thread scratch, grown once.
struct ScratchBuffer {
  void* data = nullptr;
  size_t capacity = 0;
  ~ScratchBuffer() { std::free(data); }
  void* Get(size_t bytes) {
    if (capacity < bytes) {
      std::free(data);
      data = std::malloc(bytes);
      capacity = bytes;
    }
    return data;
  }
};

// ---- Decode: a few tokens, one weight row at a time -------------------------------------------

// How far ahead of the row stream the decode kernels prefetch. Rows are contiguous, so this
// runs on into the next row; the hardware prefetcher alone kept a Q8_0 stream at ~10 GB/s on
// one Sapphire Rapids core, 1-2 KiB ahead in software ~12 (a 64-expert 16B-shape layer set,
// measured side by side; farther ahead, 8 KiB+, helped nothing).
constexpr int64_t kDecodePrefetchBytes = 1024;

// Prefetches the `bytes` (a multiple of 64) at kDecodePrefetchBytes past `p`.
inline void PrefetchAhead(const void* p, int64_t bytes) {
  const char* ahead = static_cast<const char*>(p) + kDecodePrefetchBytes;
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
}

// UNROLL independent accumulators per token keep TB·UNROLL ≥ 8 FMAs in flight per step (the
// 4-cycle FMA latency on two ports), as in the AVX2 row stream.
template <DType D, int TB>
void RowStream(const float* x, int64_t K, const MatrixView& W, int64_t row_begin, int64_t row_end,
               float* y, int64_t ldy) {
  constexpr int UNROLL = TB == 1 ? 8 : TB == 2 ? 4 : 2;
  constexpr int64_t STEP = 16 * UNROLL;
  const int64_t Kmain = K / STEP * STEP;
  for (int64_t n = row_begin; n < row_end; ++n) {
    const void* row = RowPtr(W, n);
    __m512 acc[TB][UNROLL];
    for (int t = 0; t < TB; ++t)
      for (int u = 0; u < UNROLL; ++u) acc[t][u] = _mm512_setzero_ps();
    for (int64_t k = 0; k < Kmain; k += STEP) {
      PrefetchAhead(static_cast<const char*>(row) + k * DTypeSize(D), STEP * DTypeSize(D));
      for (int u = 0; u < UNROLL; ++u) {
        const __m512 w = Load16<D>(row, k + 16 * u);
        for (int t = 0; t < TB; ++t)
          acc[t][u] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + t * K + k + 16 * u), acc[t][u]);
      }
    }
    for (int64_t k = Kmain; k < K; k += 16) {
      const __mmask16 m = FirstLanes(K - k);
      const __m512 w = Load16<D>(row, k, m);
      for (int t = 0; t < TB; ++t)
        acc[t][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + t * K + k), acc[t][0]);
    }
    for (int t = 0; t < TB; ++t) {
      __m512 sum = acc[t][0];
      for (int u = 1; u < UNROLL; ++u) sum = _mm512_add_ps(sum, acc[t][u]);
      y[t * ldy + n] = _mm512_reduce_add_ps(sum);
    }
  }
}

// One token's activations in 16-bit fixed point per block of 32 (x ≈ x16 · sx): the AVX2
// path's numerics exactly (scale amax / 32767, round to nearest even, saturate), so both fast
// tables agree with the reference within the same bound.
inline void QuantizeActivationsQ16(const float* x, int64_t K, int16_t* x16, float* sx) {
  for (int64_t b = 0; b < K / kQ8Block; ++b) {
    const __m512 lo = _mm512_loadu_ps(x + b * kQ8Block),
                 hi = _mm512_loadu_ps(x + b * kQ8Block + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
    sx[b] = amax / 32767.0f;
    const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
    int16_t* out = x16 + b * kQ8Block;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(lo, inv))));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                        _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(hi, inv))));
  }
}

// One Q8_0 row against TB tokens' 16-bit activations (token t at x16 + t·K, sx + t·K/32). A
// block of 32 weights widened to int16 fills one zmm, and one `vpdpwssd` per token sums its 32
// products exactly into 16 int32 lanes (each ≤ 2 · 127 · 32767 < 2^24, so the fp32 conversion
// is exact too); the lanes are then scaled by (weight scale · activation scale) into fp32
// accumulators, alternating between two per token so the FMA latency does not bound the stream.
template <int TB>
void Q8RowStream(const int16_t* x16, const float* sx, int64_t K, const MatrixView& W, int64_t n,
                 float* y, int64_t ldy) {
  const int8_t* row = static_cast<const int8_t*>(W.data) + n * K;
  const uint16_t* scales = W.scales + n * (K / kQ8Block);
  const int64_t blocks = K / kQ8Block;
  __m512 acc[TB][2];
  for (int t = 0; t < TB; ++t) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
  auto block = [&](int64_t b, int parity, const __m512* c) {
    const __m512i w = _mm512_cvtepi8_epi16(
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kQ8Block)));
    for (int t = 0; t < TB; ++t) {
      const __m512i xt = _mm512_loadu_si512(x16 + t * K + b * kQ8Block);
      const __m512i dot = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, xt);
      acc[t][parity] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), c[t], acc[t][parity]);
    }
  };
  int64_t b = 0;
  // Sixteen blocks at a time: sixteen weight scales (F16) times each token's sixteen activation
  // scales make one vector per token; each block's is broadcast from it by a lane permute.
  for (; b + 16 <= blocks; b += 16) {
    PrefetchAhead(row + b * kQ8Block, 16 * kQ8Block);
    const __m512 w16 =
        _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b)));
    __m512 c16[TB];
    for (int t = 0; t < TB; ++t) c16[t] = _mm512_mul_ps(w16, _mm512_loadu_ps(sx + t * blocks + b));
    for (int j = 0; j < 16; ++j) {
      __m512 c[TB];
      const __m512i lane = _mm512_set1_epi32(j);
      for (int t = 0; t < TB; ++t) c[t] = _mm512_permutexvar_ps(lane, c16[t]);
      block(b + j, j & 1, c);
    }
  }
  for (; b < blocks; ++b) {
    __m512 c[TB];
    for (int t = 0; t < TB; ++t) c[t] = _mm512_set1_ps(_cvtsh_ss(scales[b]) * sx[t * blocks + b]);
    block(b, 0, c);
  }
  for (int t = 0; t < TB; ++t)
    y[t * ldy + n] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
}

void Q8Decode(const float* x, int64_t T, const MatrixView& W, int64_t row_begin, int64_t row_end,
              float* y, int64_t ldy) {
  const int64_t K = W.cols, blocks = K / kQ8Block;
  thread_local ScratchBuffer buffer;
  int16_t* x16 = static_cast<int16_t*>(buffer.Get(static_cast<size_t>(T * (2 * K + 4 * blocks))));
  float* sx = reinterpret_cast<float*>(x16 + T * K);
  for (int64_t t = 0; t < T; ++t)
    QuantizeActivationsQ16(x + t * K, K, x16 + t * K, sx + t * blocks);
  using RowFn =
      void (*)(const int16_t*, const float*, int64_t, const MatrixView&, int64_t, float*, int64_t);
  static constexpr RowFn kRows[] = {Q8RowStream<1>, Q8RowStream<2>, Q8RowStream<3>, Q8RowStream<4>};
  for (int64_t n = row_begin; n < row_end; ++n) kRows[T - 1](x16, sx, K, W, n, y, ldy);
}

// ---- Batches: broadcast weights × packed token vectors ----------------------------------------

// Two ways to run the tiles, sharing everything but the inner step:
//   kFloat: one k per step; weight rows widened to fp32, tokens packed as fp32 xt[k][token];
//   kBf16Pairs: two k per step; weight rows kept BF16, read as 32-bit pairs (W[n, 2j],
//     W[n, 2j+1]) and broadcast; tokens rounded to BF16 and packed as pairs xt[j][token];
//     `vdpbf16ps` adds both products of a pair into each fp32 lane.
//   kInt16Pairs (Q8_0): two k per step; weight rows widened to int16 (exact), followed by their
//     block scales; tokens rounded to 16 bits per block of 32 as in decode and packed as pairs,
//     their scales packed beside them (sxt[block][token]); `vpdpwssd` adds both products of a
//     pair into each token lane's int32 sum for the block, and at the block's end the sums are
//     scaled by (weight scale × token scale) into the fp32 accumulators.
// Every way a step's elements are 4 bytes: a float, or a pair of BF16 or int16.
enum class Step { kFloat, kBf16Pairs, kInt16Pairs };

constexpr int64_t kTokenPanel = 48;  // 3 vectors of 16 tokens
constexpr int64_t kRowGroup = 16;
// Bytes of packed tokens a token block may take, so that it stays in L2 while every row group
// passes over it (a 2 MiB L2 also holds the row group and the weights being prefetched).
constexpr int64_t kTokenBlockBytes = 512 * 1024;
// From this many tokens on BF16 weights run as kBf16Pairs (see bench/bench_kernels.cc).
constexpr int64_t kBf16PairMinTokens = 48;
// From this many tokens on Q8_0 weights run as kInt16Pairs: below, a prompt chunk's expert
// share, the per-block scaling costs more than widening the weights once.
constexpr int64_t kQ8PairMinTokens = 48;

template <Step S>
int64_t StepsPerRow(int64_t K) {
  return S == Step::kFloat ? K : (K + 1) / 2;
}
// Words between buffered rows: the row's steps (and kInt16Pairs' block scales), plus 16 — rows
// 4 KiB apart would share one L1 set.
template <Step S>
int64_t BufferStride(int64_t K) {
  return StepsPerRow<S>(K) + (S == Step::kInt16Pairs ? K / kQ8Block : 0) + 16;
}

inline int64_t PanelWidth(int64_t T, int64_t p) {  // token lanes of panel p, a multiple of 16
  const int64_t n = T - p * kTokenPanel < kTokenPanel ? T - p * kTokenPanel : kTokenPanel;
  return (n + 15) / 16 * 16;
}

// fp32 → BF16, round to nearest even (the inputs are activations: finite).
inline uint32_t RoundToBf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
}

// Panels of kTokenPanel tokens at out + p·kTokenPanel·steps, each [steps][width]: word(t, j)
// for token t < T, zero for the lanes beyond.
template <class Word>
void PackPanels(int64_t T, int64_t steps, uint32_t* out, Word word) {
  for (int64_t t0 = 0; t0 < T; t0 += kTokenPanel) {
    const int64_t w = PanelWidth(T, t0 / kTokenPanel);
    const int64_t n = T - t0 < w ? T - t0 : w;
    // Step-major, so the writes are sequential; the reads walk n rows a cache line at a time.
    for (int64_t j = 0; j < steps; ++j, out += w) {
      for (int64_t i = 0; i < n; ++i) out[i] = word(t0 + i, j);
      for (int64_t i = n; i < w; ++i) out[i] = 0;
    }
  }
}

inline uint32_t FloatBits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  return bits;
}

// x [T, K] → the packed tokens xt (and for kInt16Pairs their block scales sxt, after rounding
// every token to 16 bits in x16/sx). Pairs past element K - 1 are zero.
template <Step S>
void PackTokens(const float* x, int64_t T, int64_t K, uint32_t* xt, float* sxt, int16_t* x16,
                float* sx) {
  const int64_t steps = StepsPerRow<S>(K);
  if constexpr (S == Step::kFloat) {
    PackPanels(T, steps, xt, [&](int64_t t, int64_t j) { return FloatBits(x[t * K + j]); });
  } else if constexpr (S == Step::kBf16Pairs) {
    PackPanels(T, steps, xt, [&](int64_t t, int64_t j) {
      const float* xr = x + t * K;
      return RoundToBf16(xr[2 * j]) | (2 * j + 1 < K ? RoundToBf16(xr[2 * j + 1]) << 16 : 0);
    });
  } else {
    const int64_t blocks = K / kQ8Block;
    for (int64_t t = 0; t < T; ++t)
      QuantizeActivationsQ16(x + t * K, K, x16 + t * K, sx + t * blocks);
    PackPanels(T, steps, xt, [&](int64_t t, int64_t j) {
      uint32_t pair;
      std::memcpy(&pair, x16 + t * K + 2 * j, 4);
      return pair;
    });
    PackPanels(T, blocks, reinterpret_cast<uint32_t*>(sxt),
               [&](int64_t t, int64_t b) { return FloatBits(sx[t * blocks + b]); });
  }
}

// Row n of W into `out` as the tiles read it: fp32 (kFloat), its BF16 values with a zero
// after an odd K (kBf16Pairs), or its int16 values and block scales (kInt16Pairs).
template <DType D, Step S>
void BufferRow(const MatrixView& W, int64_t n, uint32_t* out) {
  const int64_t K = W.cols;
  float* f = reinterpret_cast<float*>(out);
  if constexpr (S == Step::kBf16Pairs) {
    std::memcpy(out, RowPtr(W, n), static_cast<size_t>(K) * 2);
    if (K % 2 != 0) reinterpret_cast<uint16_t*>(out)[K] = 0;
  } else if constexpr (S == Step::kInt16Pairs) {  // int16 values, then the block scales
    const int8_t* q = static_cast<const int8_t*>(W.data) + n * K;
    const uint16_t* sc = W.scales + n * (K / kQ8Block);
    int16_t* w16 = reinterpret_cast<int16_t*>(out);
    float* scales = reinterpret_cast<float*>(out + K / 2);
    for (int64_t b = 0; b < K / kQ8Block; ++b) {
      _mm512_storeu_si512(w16 + b * kQ8Block,
                          _mm512_cvtepi8_epi16(_mm256_loadu_si256(
                              reinterpret_cast<const __m256i*>(q + b * kQ8Block))));
      scales[b] = _cvtsh_ss(sc[b]);
    }
  } else if constexpr (D == DType::kQ8_0) {
    const int8_t* q = static_cast<const int8_t*>(W.data) + n * K;
    const uint16_t* sc = W.scales + n * (K / kQ8Block);
    for (int64_t b = 0; b < K / kQ8Block; ++b) {
      const __m512 d = _mm512_set1_ps(_cvtsh_ss(sc[b]));
      for (int j = 0; j < 2; ++j) {
        const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * kQ8Block + 16 * j))));
        _mm512_storeu_ps(f + b * kQ8Block + 16 * j, _mm512_mul_ps(v, d));
      }
    }
  } else {
    const void* row = RowPtr(W, n);
    for (int64_t k = 0; k < K; k += 16) {
      _mm512_mask_storeu_ps(f + k, FirstLanes(K - k), Load16<D>(row, k, FirstLanes(K - k)));
    }
  }
}

// Weight bytes to bring into cache while a tile computes: the next row group's, spread over the
// tile's steps (`stride` bytes further each step), so its buffering finds them in cache.
struct Prefetch {
  const char* begin;
  int64_t stride;  // 0: nothing to bring in (begin then points at data already in cache)
};

// The accumulators of a tile (lanes = tokens) into y[t, r] for its first `tokens` tokens:
// whole-vector stores with constant indices first (see the AVX2 tile: a store inside a loop
// with a runtime bound keeps the accumulators in memory).
template <int RB, int NV>
inline void StoreTile(const __m512 (&acc)[RB][NV], float* y, int64_t ldy, int64_t tokens) {
  alignas(64) float tile[RB][NV][16];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) _mm512_store_ps(tile[r][v], acc[r][v]);
  for (int64_t t = 0; t < tokens; ++t)
    for (int r = 0; r < RB; ++r) y[t * ldy + r] = tile[r][t / 16][t % 16];
}

// RB buffered rows (wf, `ldw` apart) × the NV token vectors of one panel (xt, width 16·NV).
// (The loops over r and v must be unrolled whole, or gcc keeps the accumulators in memory.)
template <Step S, int RB, int NV>
void BroadcastTile(const uint32_t* xt, const float* /*sxt*/, int64_t K, const uint32_t* wf,
                   int64_t ldw, float* y, int64_t ldy, int64_t tokens, Prefetch pf) {
  __m512 acc[RB][NV];
#pragma GCC unroll 16
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  constexpr int64_t w = 16 * NV;
  const int64_t steps = StepsPerRow<S>(K);
  const char* ahead = pf.begin;
  for (int64_t j = 0; j < steps; ++j) {
    _mm_prefetch(ahead, _MM_HINT_T0);
    ahead += pf.stride;
    __m512 xv[NV];
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_ps(xt + j * w + 16 * v);
#pragma GCC unroll 16
    for (int r = 0; r < RB; ++r) {
      if constexpr (S == Step::kFloat) {
        const __m512 b = _mm512_set1_ps(reinterpret_cast<const float*>(wf)[r * ldw + j]);
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(b, xv[v], acc[r][v]);
      } else {
        const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(wf[r * ldw + j]));
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], b, (__m512bh)xv[v]);
      }
    }
  }
  StoreTile<RB, NV>(acc, y, ldy, tokens);
}

// One Q8_0 tile (kInt16Pairs): RB buffered rows × NV token vectors, a block of 32 k (16 steps)
// at a time. Each block's int32 sums stay below 16 · 2 · 127 · 32767 < 2^31.
template <int RB, int NV>
void Int16PairTile(const uint32_t* xt, const float* sxt, int64_t K, const uint32_t* wf, int64_t ldw,
                   float* y, int64_t ldy, int64_t tokens, Prefetch pf) {
  constexpr int64_t w = 16 * NV;
  __m512 acc[RB][NV];
#pragma GCC unroll 4
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const char* ahead = pf.begin;
  for (int64_t b = 0; b < K / kQ8Block; ++b) {
    __m512i dot[RB][NV];
#pragma GCC unroll 4
    for (int r = 0; r < RB; ++r)
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) dot[r][v] = _mm512_setzero_si512();
    for (int64_t j = b * kQ8Block / 2; j < (b + 1) * kQ8Block / 2; ++j) {
      _mm_prefetch(ahead, _MM_HINT_T0);
      ahead += pf.stride;
      __m512i xv[NV];
#pragma GCC unroll 3
      for (int v = 0; v < NV; ++v) xv[v] = _mm512_loadu_si512(xt + j * w + 16 * v);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const __m512i pair = _mm512_set1_epi32(static_cast<int>(wf[r * ldw + j]));
#pragma GCC unroll 3
        for (int v = 0; v < NV; ++v) dot[r][v] = _mm512_dpwssd_epi32(dot[r][v], pair, xv[v]);
      }
    }
#pragma GCC unroll 3
    for (int v = 0; v < NV; ++v) {
      const __m512 token_scales = _mm512_loadu_ps(sxt + b * w + 16 * v);
#pragma GCC unroll 4
      for (int r = 0; r < RB; ++r) {
        const float weight_scale = reinterpret_cast<const float*>(wf + r * ldw + K / 2)[b];
        acc[r][v] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][v]),
                            _mm512_mul_ps(token_scales, _mm512_set1_ps(weight_scale)), acc[r][v]);
      }
    }
  }
  StoreTile<RB, NV>(acc, y, ldy, tokens);
}

// The tile for S: RB rows × NV token vectors.
template <Step S, int RB, int NV>
void Tile(const uint32_t* xt, const float* sxt, int64_t K, const uint32_t* wf, int64_t ldw,
          float* y, int64_t ldy, int64_t tokens, Prefetch pf) {
  if constexpr (S == Step::kInt16Pairs) {
    Int16PairTile<RB, NV>(xt, sxt, K, wf, ldw, y, ldy, tokens, pf);
  } else {
    BroadcastTile<S, RB, NV>(xt, sxt, K, wf, ldw, y, ldy, tokens, pf);
  }
}

// RB rows × one panel of `tokens` tokens (1–3 vectors).
template <Step S, int RB>
void RowsPanel(const uint32_t* xt, const float* sxt, int64_t K, const uint32_t* wf, int64_t ldw,
               float* y, int64_t ldy, int64_t tokens, Prefetch pf) {
  switch ((tokens + 15) / 16) {
    case 1:
      return Tile<S, RB, 1>(xt, sxt, K, wf, ldw, y, ldy, tokens, pf);
    case 2:
      return Tile<S, RB, 2>(xt, sxt, K, wf, ldw, y, ldy, tokens, pf);
    default:
      return Tile<S, RB, 3>(xt, sxt, K, wf, ldw, y, ldy, tokens, pf);
  }
}

// One buffered row group (rb rows at wf, ldw words apart) × one token panel (xt, and sxt for
// kInt16Pairs). A whole group as tiles of 16 or 24 accumulators (16 rows × 1 vector, 8 × 2,
// 8 × 3); kInt16Pairs, which holds an int32 sum beside each accumulator, and a partial group 4
// rows at a time. Only the first tile prefetches `pf`.
template <Step S>
void GroupPanel(const uint32_t* xt, const float* sxt, int64_t K, int64_t tokens, int64_t rb,
                const uint32_t* wf, int64_t ldw, float* y, int64_t ldy, Prefetch pf) {
  const Prefetch cached{reinterpret_cast<const char*>(wf), 0};
  if (S != Step::kInt16Pairs && rb == kRowGroup) {
    if (tokens <= 16) return Tile<S, 16, 1>(xt, sxt, K, wf, ldw, y, ldy, tokens, pf);
    RowsPanel<S, 8>(xt, sxt, K, wf, ldw, y, ldy, tokens, pf);
    return RowsPanel<S, 8>(xt, sxt, K, wf + 8 * ldw, ldw, y + 8, ldy, tokens, cached);
  }
  using PanelFn = void (*)(const uint32_t*, const float*, int64_t, const uint32_t*, int64_t, float*,
                           int64_t, int64_t, Prefetch);
  static constexpr PanelFn kPanels[] = {RowsPanel<S, 1>, RowsPanel<S, 2>, RowsPanel<S, 3>,
                                        RowsPanel<S, 4>};
  for (int64_t r = 0; r < rb; r += 4) {
    const int64_t n = rb - r < 4 ? rb - r : 4;
    kPanels[n - 1](xt, sxt, K, wf + r * ldw, ldw, y + r, ldy, tokens, r == 0 ? pf : cached);
  }
}

// y[t, n] for all T tokens and rows [row_begin, row_end): the tokens are packed once, then each
// block of token panels that fits in L2 is swept by every row group (buffered once per block:
// once per call for up to a block's tokens, so an expert's weights come from memory once).
template <DType D, Step S>
void BatchGemm(const float* x, int64_t T, const MatrixView& W, int64_t row_begin, int64_t row_end,
               float* y, int64_t ldy) {
  const int64_t K = W.cols, steps = StepsPerRow<S>(K), ldw = BufferStride<S>(K);
  const int64_t panels = (T + kTokenPanel - 1) / kTokenPanel;
  // kInt16Pairs also packs the tokens' block scales and rounds the tokens first (x16, sx).
  const int64_t blocks = S == Step::kInt16Pairs ? K / kQ8Block : 0;
  const int64_t panel_words = kTokenPanel * (steps + blocks);
  thread_local ScratchBuffer buffer;
  uint32_t* xt =
      static_cast<uint32_t*>(buffer.Get(static_cast<size_t>(panels * panel_words + kRowGroup * ldw +
                                                            (blocks ? T * (K / 2 + blocks) : 0)) *
                                        4));
  float* sxt = reinterpret_cast<float*>(xt + panels * kTokenPanel * steps);
  uint32_t* wf = xt + panels * panel_words;
  int16_t* x16 = reinterpret_cast<int16_t*>(wf + kRowGroup * ldw);
  float* sx = reinterpret_cast<float*>(x16 + T * K);
  PackTokens<S>(x, T, K, xt, sxt, x16, sx);
  const int64_t fit = kTokenBlockBytes / (panel_words * 4);
  const int64_t panels_per_block = fit > 1 ? fit : 1;
  // Bytes of one row (Q8_0: its int8 values; the scales are few and follow their own stream).
  const int64_t row_bytes = K * (D == DType::kF32 ? 4 : D == DType::kQ8_0 ? 1 : 2);
  for (int64_t p0 = 0; p0 < panels; p0 += panels_per_block) {
    const int64_t p1 = p0 + panels_per_block < panels ? p0 + panels_per_block : panels;
    for (int64_t n0 = row_begin; n0 < row_end; n0 += kRowGroup) {
      const int64_t rb = row_end - n0 < kRowGroup ? row_end - n0 : kRowGroup;
      for (int64_t r = 0; r < rb; ++r) BufferRow<D, S>(W, n0 + r, wf + r * ldw);
      const int64_t next = row_end - (n0 + rb) < kRowGroup ? row_end - (n0 + rb) : kRowGroup;
      Prefetch pf{static_cast<const char*>(W.data) + (n0 + rb) * row_bytes,
                  (next * row_bytes + steps - 1) / steps};
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t tokens =
            T - p * kTokenPanel < kTokenPanel ? T - p * kTokenPanel : kTokenPanel;
        GroupPanel<S>(xt + p * kTokenPanel * steps, sxt + p * kTokenPanel * blocks, K, tokens, rb,
                      wf, ldw, y + p * kTokenPanel * ldy + n0, ldy, pf);
        pf = {reinterpret_cast<const char*>(wf), 0};  // the first panel brought them in
      }
    }
  }
}

template <DType D, bool kBf16Dot>
void MatMulRowsTyped(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                     int64_t row_end, float* y, int64_t ldy) {
  if constexpr (D == DType::kQ8_0) {
    if (T <= 4) return Q8Decode(x, T, W, row_begin, row_end, y, ldy);
    if (T >= kQ8PairMinTokens)
      return BatchGemm<D, Step::kInt16Pairs>(x, T, W, row_begin, row_end, y, ldy);
  } else {
    using StreamFn =
        void (*)(const float*, int64_t, const MatrixView&, int64_t, int64_t, float*, int64_t);
    static constexpr StreamFn kStreams[] = {RowStream<D, 1>, RowStream<D, 2>, RowStream<D, 3>,
                                            RowStream<D, 4>};
    if (T <= 4) return kStreams[T - 1](x, W.cols, W, row_begin, row_end, y, ldy);
  }
  if constexpr (D == DType::kBF16 && kBf16Dot) {
    if (T >= kBf16PairMinTokens)
      return BatchGemm<D, Step::kBf16Pairs>(x, T, W, row_begin, row_end, y, ldy);
  }
  BatchGemm<D, Step::kFloat>(x, T, W, row_begin, row_end, y, ldy);
}

template <bool kBf16Dot>
void MatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin, int64_t row_end,
                float* y, int64_t ldy) {
  if (T <= 0 || row_begin >= row_end) return;
  // 5–8 tokens: the AVX2 tiles' 8-token vectors fit them exactly, where a 16-token vector would
  // be half padding (one core, [1408, 2048] BF16 × 8 tokens: 57 GFLOP/s against 41).
  if (T > 4 && T <= 8) {
    static const auto avx2_matmul = Avx2Kernels()->matmul_rows;
    return avx2_matmul(x, T, W, row_begin, row_end, y, ldy);
  }
  switch (W.dtype) {
    case DType::kQ8_0:
      return MatMulRowsTyped<DType::kQ8_0, kBf16Dot>(x, T, W, row_begin, row_end, y, ldy);
    case DType::kI8:
      return;  // not a weight format: Q8_0 carries its scales
    case DType::kF32:
      return MatMulRowsTyped<DType::kF32, kBf16Dot>(x, T, W, row_begin, row_end, y, ldy);
    case DType::kBF16:
      return MatMulRowsTyped<DType::kBF16, kBf16Dot>(x, T, W, row_begin, row_end, y, ldy);
    case DType::kF16:
      return MatMulRowsTyped<DType::kF16, kBf16Dot>(x, T, W, row_begin, row_end, y, ldy);
  }
}

// ---- Vector ops ------------------------------------------------------------------------------

float Dot(const float* a, const float* b, int64_t n) {
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), _mm512_loadu_ps(b + i + 16), acc1);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = FirstLanes(n - i);
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

void Axpy(float a, const float* x, float* y, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = FirstLanes(n - i);
    _mm512_mask_storeu_ps(
        y + i, m,
        _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + i), _mm512_maskz_loadu_ps(m, y + i)));
  }
}

// e^x to within ~2 ulp on the range that matters (inputs clamped to ±88): 2^n · p(r) with
// r = x − n·ln2 split in two parts for accuracy, p the AVX2 kernel's polynomial; `vscalefps`
// applies 2^n.
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
  p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = FirstLanes(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 denom = _mm512_add_ps(one, Exp(_mm512_sub_ps(zero, g)));
    _mm512_mask_storeu_ps(out + i, m,
                          _mm512_mul_ps(_mm512_div_ps(g, denom), _mm512_maskz_loadu_ps(m, up + i)));
  }
}

template <DType D>
void WidenRun(const void* row, int64_t n, float* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = FirstLanes(n - i);
    _mm512_mask_storeu_ps(out + i, m, Load16<D>(row, i, m));
  }
}

void RowToF32(const void* row, DType dtype, int64_t n, float* out) {
  switch (dtype) {
    case DType::kF32:
      return WidenRun<DType::kF32>(row, n, out);
    case DType::kBF16:
      return WidenRun<DType::kBF16>(row, n, out);
    case DType::kF16:
      return WidenRun<DType::kF16>(row, n, out);
    case DType::kI8:
    case DType::kQ8_0:  // the raw int8 values, as the AVX2 table gives (Q8_0 needs its scales)
      for (int64_t i = 0; i < n; ++i) out[i] = static_cast<const int8_t*>(row)[i];
      return;
  }
}

// Attention stays on the AVX2 functions (these tables only run where AVX2 does too).
template <bool kBf16Dot>
KernelTable MakeTable(const char* name) {
  const KernelTable* avx2 = Avx2Kernels();
  KernelTable t{name,         MatMulRows<kBf16Dot>, Dot, Axpy, SiluMul, RowToF32,
                avx2->attend, avx2->attend_causal};
  t.bf16_activation_min_tokens = kBf16Dot ? kBf16PairMinTokens : 0;
  t.q8_activation_min_tokens = kQ8PairMinTokens;
  return t;
}

}  // namespace

const KernelTable* Avx512Kernels() {
  static const KernelTable table = MakeTable<false>("avx512");
  return &table;
}

const KernelTable* Avx512Bf16DotKernels() {
  static const KernelTable table = MakeTable<true>("avx512bf16");
  return &table;
}

}  // namespace dsmoe::ops
