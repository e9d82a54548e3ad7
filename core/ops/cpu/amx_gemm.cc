// AMX kernels. This file alone is compiled with -mamx-tile -mamx-bf16 -mamx-int8, AVX-512
// (F/BW/VL/BF16) and F16C: nothing here but AmxUsable() runs unless AmxUsable() said the CPU and
// the OS allow it. AmxUsable() itself is plain scalar code (CPUID, XGETBV, a system call and one
// log line), so it is safe on any x86-64; like avx2_kernels.cc, this file instantiates no inline
// function or template shared with other files (the linker could keep this copy for a CPU
// without these instructions), hence malloc and snprintf instead of std::vector and std::string.
//
// How a product is computed (BF16 weights, TDPBF16PS):
//   - the activations x [T, K] are converted to P BF16 parts (P = 1, 2, 3: AmxPrecision, below)
//     once per call, or once per matrix by AmxPackActivations, and laid out as A tiles: for
//     each group of 16 tokens and each block of 32 values of K, P 16 × 32 BF16 tiles (1 KiB
//     each, contiguous, part after part). Tokens past T and values past K are zeros, so any T
//     and K are exact;
//   - the weights are repacked per panel of 16 rows into B tiles: block j of a panel holds, for
//     k-pair p and row n, the two BF16 values W[n, 32j + 2p], W[n, 32j + 2p + 1] side by side
//     (the "VNNI" pair layout TDPBF16PS reads: B row p, column n). A 16 × 16 transposition of
//     32-bit pairs in AVX-512 registers; rows past row_end and values past K are zeros;
//   - C tile (16 tokens × 16 rows, fp32) += A · B over all K blocks and parts; 2 × 2 C tiles at
//     a time (tmm0-3), two A (tmm4-5) and two B tiles (tmm6-7): each B tile is loaded once per
//     block for all P parts, each A tile feeds two TDPBF16PS.
//     Blocks of 8 panels (128 rows, 512 KiB at K = 2048) are packed at a time and swept by
//     every pair of token tiles: 4 and 16 panels were slower, 32 much slower.
// That is the token-tile orientation (AmxLayout::kTokenTiles). With few tokens each packed
// weight block feeds few TDPBF16PS (a routed expert sees ~48 tokens of a 512-token chunk: 3
// token tiles, 9 TDPBF16PS per 16 × 32 block transposed in exact mode), so the transposition
// costs a large share. The transposed orientation (AmxLayout::kWeightTiles, from x packed
// once per matrix) computes yᵀ = W · xᵀ instead:
//   - x's parts are the B tiles: the A-tile layout above read as 16 × 16 32-bit pairs and
//     transposed once, as x is packed (tile (i, j, part) at the same place);
//   - a panel of 16 weight rows is the A tile as the matrix stores it: 16 rows × 32 BF16,
//     TILELOADD straight from W with the row pitch as stride. Copied instead (zeros past the
//     rows and K) where the panel passes the matrix's end or K is not whole blocks, and where
//     rows are a multiple of 4 KiB apart (K = 2048: the 16 rows of a tile in one L1 set; a copy
//     with one spare cache line per row measured 5-15% faster). Q8_0 panels hold q widened to
//     BF16 (exact, no transposition) and their scales, per block, as below;
//   - C tile (16 rows × 16 tokens) += A · B, 2 × 2 at a time as above, groups of 8 panels
//     swept by every pair of token tiles (2 panels at a time was 25-30% slower from 256
//     tokens: the activations then stream from L3 for every panel pair); each C tile is
//     stored, transposed in registers and written to y once per full K.
//   Each product and its place in the fp32 sum are those of the token-tile orientation (the
//   parts of a block in the same order, hi, mid, lo), so everything said below of exactness
//   holds for both. The caller picks one per call: ops::KernelTable's prepared hooks for the
//   amx table (core/ops/kernels.cc) use weight tiles up to 48 tokens for BF16, 256 for Q8_0.
// Where the time goes. In the model (perf record of a 512-token prefill of the medium preset,
// BF16, 2 threads, before x was packed once per matrix): PackPanelBf16 26.6%, the tile loop
// 17.1%, converting x 13.5% — x was converted by each of ~16 row tasks per matrix (ops::Linear)
// and per (expert, row chunk) for gate and up each (RunMlps). Now x is prepared once per
// matrix, once for gate and up together (KernelTable::prepare), and small batches skip the
// weight transposition (weight tiles). bench/bench_amx.cc, exact mode, GFLOP per CPU-second,
// rows split as ops::Linear splits them, x converted per row task (before) → ops::Linear with
// the amx table (after), measured on a shared 2-vCPU Xeon (load average 2.3-2.7):
//   K = 2048 → N = 1408 (a routed expert), 1 thread:  BF16 T = 16: 161 → 179, T = 48: 255 →
//   297, T = 128: 253 → 326; Q8_0 T = 16: 127 → 169, T = 48: 171 → 217, T = 128: 196 → 224.
//   2 threads (which then got about one core between them): BF16 T = 48: 193 → 303, T = 128:
//   196 → 311; Q8_0 T = 48: 154 → 229, T = 128: 156 → 235;
//   K = 2048 → N = 10944 (shared experts, dense layer), T = 512, 1 thread: BF16 389 → 400,
//   Q8_0 240 → 247 (converting x is a small share there; 2 threads: BF16 342 → 397).
// dsmoe_bench_engine --presets medium --prompt 512 (chunks of 256: ~24 tokens per routed
// expert), prefill tok/s, main's binary and this one alternated on the same machine. In a quiet
// spell (load average 0.3-1.4, two runs each, best): BF16 1 thread 322 → 336, 2 threads 566 →
// 609; Q8_0 1 thread 241 → 284, 2 threads 426 → 508. Under other builds (load 2-9, six runs
// each, best (median)): BF16 1 thread 277 (267) → 304 (279), Q8_0 219 (213) → 251 (243); the 2-
// thread figures there spread 200-510 for either binary. perf of `dsmoe logits` on 512 tokens
// (medium BF16, 2 threads) after: the weight-tile product 51% (its time in the weight tiles'
// loads from memory), the fp32 kernels for batches of 5-15 tokens (routed experts that few
// tokens reach: avx512 BatchGemm, avx2) 18%, the lm_head's token tiles (T = 512) 13%
// (PackPanelBf16 10%), PackActivations 0.8%.
// The kernel alone (one core of the Xeon this was written on, K = 2048, N = 1408, T = 512,
// CPU time): the tile loop alone reaches 1.1-1.3 TFLOP/s with these working sets (2.5-3 with
// everything in L1) — each step loads 4 KiB of tiles from L2 for 4 TDPBF16PS — and the whole
// call ~0.8: packing the weights (~10%), converting x (~10%, it is read from L3) and storing C.
// At P = 3 (exact) the whole call ran at ~0.45-0.6 of P = 1's rate per CPU-second (three times
// the TDPBF16PS; the weight packing and B loads shared; three A tiles written per conversion,
// which makes packing x once per matrix pay more than at P = 1).
// TDPBF16PS multiplies BF16 pairs exactly and accumulates in fp32 (round to nearest even; BF16
// denormal inputs count as zero and fp32 denormal results are flushed, as the instruction
// defines).
//
// The activation parts (AmxPrecision):
//   - P = 1: x rounded to nearest even (VCVTNE2PS2BF16), relative error ≤ 2^-8;
//   - P = 3: hi = x with the low 16 bits of its fp32 encoding cleared (BF16 by truncation, same
//     sign, |hi| ≤ |x|); r = x - hi, exact in fp32 (r is x's low 16 significand bits); mid = r
//     truncated the same way; lo = r - mid, exact again. For normal x of exponent e, x is a
//     multiple of 2^(e-23) and r < 2^(e-7); mid keeps r's leading 8 bits, so lo is a multiple of
//     2^(e-23) below 2^(lead(r)-7) ≤ 2^(e-15): at most 8 significant bits, a BF16 value, and
//     hi + mid + lo = x exactly. Round to nearest would split exactly too (r then has a sign and
//     ≤ 16 bits), but it overflows: BF16 rounding of an |x| ≥ 0x1.FFp127 is inf, and with mid
//     rounded up the partial sum hi + mid can pass FLT_MAX where x does not. With truncation all
//     three parts have x's sign and each partial sum (hi, hi + mid, x) is nearer zero than x.
//     Edges: the parts are exact but TDPBF16PS reads a BF16 part below 2^-126 as zero, so for
//     |x| < 2^-103 the parts below 2^-126 are lost (under 2^-125 per activation in all), and a
//     denormal x is zero (as in P = 1). ±inf x: hi = x, mid = lo = 0. NaN x: hi = x, converted
//     by VCVTNE2PS2BF16 (which keeps it a NaN; truncation could turn one whose payload is only in
//     the low bits into inf), mid = lo = 0. A weight of ±inf gives NaN (0 · ∞ from a zero
//     part);
//   - P = 2: hi + mid, x - lo: relative error < 2^-15, toward zero.
// Each part multiplies the same weight tile (B in token tiles, A in weight tiles), so the work
// in TDPBF16PS and activation tile loads is P times that of P = 1, the weight packing and loads
// are shared.
//
// Q8_0 weights go through the same BF16 tiles. In token tiles at P = 1 each 16-row panel is
// dequantized (q · d) and rounded to BF16 as it is packed, once per call, then reused by every
// token. At P ≥ 2 that rounding would undo the exact activations (q · d has up to 8 + 11
// significant bits, BF16 8; splitting the weights too would multiply the tile work by 3 again), so
// the panels hold q itself, exact in BF16, and a K block of 32 is exactly one Q8_0 block: each
// block's products go to fresh C tiles, which are stored and added into fp32 accumulators times the
// 16 rows' scales (one FMA per value and block), y = Σ_j d[n, j] · Σ_{k in j} x_k · q[n, k] — exact
// up to fp32 rounding, like the AVX2 kernel's q · d in fp32. That vector work (per block and 16 ×
// 16 tile: a tile store, 16 loads and 16 FMAs into accumulators kept in L1) runs beside the block's
// P TDPBF16PS per tile. Weight tiles do the same at every P (P = 1 too: q, not q · d rounded),
// with a row's scale broadcast over a row of C (rows are C's rows there). It costs: Q8_0 exact ran
// at ~0.65-0.9 of BF16 exact's rate per CPU-second in bench/bench_amx.cc. Tried and not kept: 2
// token tiles × 1 panel with two sets of C tiles taking turns (block j + 1's products issued before
// block j's are stored and scaled) was ~10% faster with x converted per call but ~20% slower with x
// packed once (twice the A tile loads). The int8 tiles (TDPBSSD, twice TDPBF16PS's rate on paper)
// were not used: their K step is 64 values, two Q8_0 blocks of different scales, so every 32-wide
// block would need a C tile of its own, stored and multiplied by the outer product of the token and
// row scales in AVX-512 registers (16 loads, converts and FMAs per 16 × 16 tile and block) — the
// work the exact mode does per block, but for a tile step of half the work — and the activations
// would be quantized to int8 (error up to amax/254 of each block, where BF16 rounds each value to
// 2^-8 of itself).
#include "core/ops/cpu/amx_gemm.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string_view>

#include "core/util/log.h"

#if defined(__x86_64__)
#include <cpuid.h>
// gcc 12's AVX-512 shuffles start from _mm512_undefined_epi32(), a deliberately uninitialised
// value it then warns about (-Wmaybe-uninitialized, and -Wuninitialized where the shuffled
// values come from a tile store, which it does not see write memory) wherever they are inlined.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#endif

namespace dsmoe::ops {

#if defined(__x86_64__)
namespace {

// Linux's arch_prctl codes and the XSAVE component of the tile data (arch/x86/include/uapi/
// asm/prctl.h; Documentation/arch/x86/xstate.rst): the tile data state is "dynamic", so a
// process must ask for it before its first AMX instruction, or that instruction faults.
constexpr int kArchGetXcompPerm = 0x1022;
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtileCfg = 17;
constexpr int kXfeatureXtileData = 18;

uint64_t Xgetbv(uint32_t index) {
  uint32_t eax, edx;
  asm volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(index));
  return eax | (static_cast<uint64_t>(edx) << 32);
}

// Null when AMX may be used; otherwise why not (written into `buf` where it needs a number).
const char* ProbeAmx(char* buf, size_t size) {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || (ecx & (1u << 27)) == 0)
    return "the OS has not enabled XSAVE (no OSXSAVE)";
  if (__get_cpuid_max(0, nullptr) < 7 || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
    return "CPUID has no leaf 7";
  if ((edx & (1u << 24)) == 0) return "the CPU has no AMX-TILE";
  if ((edx & (1u << 22)) == 0) return "the CPU has no AMX-BF16";
  if ((edx & (1u << 25)) == 0) return "the CPU has no AMX-INT8";
  const uint64_t xcr0 = Xgetbv(0);
  const uint64_t tile_bits =
      (uint64_t{1} << kXfeatureXtileCfg) | (uint64_t{1} << kXfeatureXtileData);
  if ((xcr0 & tile_bits) != tile_bits)
    return "the kernel has not enabled the AMX tile state (XCR0 bits 17/18)";
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) != 0) {
    std::snprintf(buf, size, "Linux refused the AMX tile data state (arch_prctl: %s)",
                  std::strerror(errno));
    return buf;
  }
  unsigned long permitted = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &permitted) != 0 ||
      (permitted & (1ul << kXfeatureXtileData)) == 0)
    return "Linux did not grant the AMX tile data state (ARCH_GET_XCOMP_PERM)";
  return nullptr;
}

bool ProbeAndLog() {
  char buf[160];
  const char* why = ProbeAmx(buf, sizeof buf);
  if (why == nullptr) return true;
  char line[200];
  const int n = std::snprintf(line, sizeof line, "AMX kernels not used: %s", why);
  DefaultLogger()->Log(
      LogLevel::kInfo,
      std::string_view(line, n > 0 && n < static_cast<int>(sizeof line) ? static_cast<size_t>(n)
                                                                        : std::strlen(line)));
  return false;
}

constexpr int64_t kTileRows = 16;  // tokens of an A tile and C tile; k-pairs of a B tile
constexpr int64_t kTileK = 32;     // BF16 values of K per A tile row (64 bytes)
constexpr int64_t kTileElems = kTileRows * kTileK;  // BF16 values in one A or B tile (1 KiB)
// Panels of 16 weight rows packed at a time: 128 rows × K = 512 KiB of BF16 at K = 2048, which
// stays in L2 beside the tile pair of activations being swept over them.
constexpr int64_t kPanelsPerBlock = 8;

// Per-thread scratch, grown once, 64-byte aligned (one tile row per cache line).
struct ScratchBuffer {
  void* raw = nullptr;
  uint16_t* data = nullptr;
  size_t capacity = 0;  // uint16_t elements
  ~ScratchBuffer() { std::free(raw); }
  uint16_t* Get(size_t elems) {
    if (capacity < elems) {
      std::free(raw);
      raw = std::malloc(elems * sizeof(uint16_t) + 64);
      data = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t{63});
      capacity = elems;
    }
    return data;
  }
};

uint16_t* ActivationScratch(size_t elems) {
  thread_local ScratchBuffer buffer;
  return buffer.Get(elems);
}
uint16_t* WeightScratch(size_t elems) {
  thread_local ScratchBuffer buffer;
  return buffer.Get(elems);
}
float* ScaleScratch(size_t floats) {
  thread_local ScratchBuffer buffer;
  return reinterpret_cast<float*>(buffer.Get(2 * floats));
}

// The tile configuration (LDTILECFG's 64-byte operand): palette 1, all eight tiles 16 rows of
// 64 bytes — fp32 C tiles are 16 × 16, BF16 A tiles 16 × 32, B tiles 16 pairs × 16 columns.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved0[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void ConfigureTiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = kTileRows;
  }
  _tile_loadconfig(&cfg);
}

// Mask of the first `n` (0 … 16) 32-bit lanes.
inline __mmask16 FirstLanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1);
}

// The high 16 bits of each value's fp32 encoding, kept in place (the low 16 cleared).
inline __m512 TruncateToBf16(__m512 v) {
  return _mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// The first `parts` (2 or 3) BF16 parts of 16 activations, each held in an fp32 lane whose low
// 16 bits are zero (NaN lanes excepted: see the file comment): part[0] + part[1] + part[2] = v.
inline void SplitActivations(__m512 v, int parts, __m512 part[3]) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000);
  const __mmask16 special = _mm512_cmpeq_epi32_mask(
      _mm512_and_si512(_mm512_castps_si512(v), exponent), exponent);  // ±inf, NaN
  part[0] = _mm512_mask_mov_ps(TruncateToBf16(v), special, v);
  const __m512 rest = _mm512_maskz_sub_ps(static_cast<__mmask16>(~special), v, part[0]);
  part[1] = TruncateToBf16(rest);
  if (parts > 2) part[2] = _mm512_sub_ps(rest, part[1]);
}

// Token tiles [i0, i1) of x [T, K] fp32 → A tiles in `a`: the `parts` (1-3) tiles of token tile
// i and block j at a + ((i·KB + j)·parts + part)·512 hold tokens 16i … 16i+15 and values
// 32j … 32j+31 as that BF16 part (file comment); zeros past T and K.
void PackActivations(const float* x, int64_t T, int64_t K, int parts, int64_t i0, int64_t i1,
                     uint16_t* a) {
  const int64_t KB = (K + kTileK - 1) / kTileK;
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t r = 0; r < kTileRows; ++r) {
      const int64_t t = i * kTileRows + r;
      uint16_t* out = a + i * KB * parts * kTileElems + r * kTileK;
      if (t >= T) {
        for (int64_t j = 0; j < KB * parts; ++j)
          _mm512_storeu_si512(out + j * kTileElems, _mm512_setzero_si512());
        continue;
      }
      const float* xr = x + t * K;
      for (int64_t j = 0; j < KB; ++j) {
        const int64_t k = j * kTileK, left = K - k;
        __m512 lo, hi;
        if (left >= kTileK) {
          lo = _mm512_loadu_ps(xr + k);
          hi = _mm512_loadu_ps(xr + k + 16);
        } else {
          lo = _mm512_maskz_loadu_ps(FirstLanes(left), xr + k);
          hi = _mm512_maskz_loadu_ps(FirstLanes(left - 16 > 0 ? left - 16 : 0), xr + k + 16);
        }
        uint16_t* block = out + j * parts * kTileElems;
        // cvtne2ps_pbh(hi, lo): the second operand fills the low 16 values. On the split parts
        // (low 16 bits zero) it rounds nothing: it keeps the high halves.
        if (parts == 1) {
          _mm512_storeu_si512(block, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
          continue;
        }
        __m512 lo_parts[3], hi_parts[3];
        SplitActivations(lo, parts, lo_parts);
        SplitActivations(hi, parts, hi_parts);
        for (int p = 0; p < parts; ++p)
          _mm512_storeu_si512(block + p * kTileElems, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(
                                                          hi_parts[p], lo_parts[p])));
      }
    }
  }
}

// In-register transpose of a 16 × 16 matrix of 32-bit elements: r[i] lane c ↔ r[c] lane i.
inline void Transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c], 128-bit lane L: rows 4g … 4g+3 at column 4L + c.
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g + 0], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g + 0], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
  for (int c = 0; c < 4; ++c) {
    const __m512i a0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    const __m512i a1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
    const __m512i b0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i b1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[0 + c] = _mm512_shuffle_i32x4(a0, b0, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(a1, b1, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(a0, b0, 0xDD);
    r[12 + c] = _mm512_shuffle_i32x4(a1, b1, 0xDD);
  }
}

// Rows [n0, n0 + rows) (rows ≤ 16) of a BF16 matrix → one panel of KB B tiles at `b`: tile j
// row p column n = the pair W[n0 + n, 32j + 2p … 32j + 2p + 1]; zeros past `rows` and K.
void PackPanelBf16(const MatrixView& W, int64_t n0, int64_t rows, uint16_t* b) {
  const int64_t K = W.cols, KB = (K + kTileK - 1) / kTileK;
  const uint16_t* base = static_cast<const uint16_t*>(W.data) + n0 * K;
  for (int64_t j = 0; j < KB; ++j) {
    const int64_t k = j * kTileK, left = K - k;
    // 32 BF16 values = 16 pairs per row; a partial last block loads only its own values (never
    // the next row's, never past the matrix).
    const __mmask32 mask = left >= kTileK ? static_cast<__mmask32>(0xffffffffu)
                                          : static_cast<__mmask32>((1u << left) - 1);
    __m512i r[16];
    for (int64_t n = 0; n < 16; ++n)
      r[n] = n < rows ? _mm512_maskz_loadu_epi16(mask, base + n * K + k) : _mm512_setzero_si512();
    Transpose16x16(r);
    uint16_t* out = b + j * kTileElems;
    for (int p = 0; p < 16; ++p) _mm512_store_si512(out + p * kTileK, r[p]);
  }
}

// Rows [n0, n0 + rows) (rows ≤ 16) of a Q8_0 matrix → one panel of BF16 B tiles, as
// PackPanelBf16 lays them out: each weight q · d (exact in fp32: 8 × 11 significant bits) is
// rounded to BF16. A Q8_0 block (32 values, one scale) is exactly one tile block of K.
// REQUIRES: K % 32 == 0 (the Q8_0 format).
void PackPanelQ8(const MatrixView& W, int64_t n0, int64_t rows, uint16_t* b) {
  const int64_t K = W.cols, KB = K / kTileK;
  const int8_t* base = static_cast<const int8_t*>(W.data) + n0 * K;
  const uint16_t* scales = W.scales + n0 * KB;
  for (int64_t j = 0; j < KB; ++j) {
    __m512i r[16];
    for (int64_t n = 0; n < 16; ++n) {
      if (n >= rows) {
        r[n] = _mm512_setzero_si512();
        continue;
      }
      const __m512 d = _mm512_set1_ps(_cvtsh_ss(scales[n * KB + j]));
      const __m256i q =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + n * K + j * kTileK));
      const __m512 lo =
          _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q))), d);
      const __m512 hi = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1))), d);
      r[n] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    Transpose16x16(r);
    uint16_t* out = b + j * kTileElems;
    for (int p = 0; p < 16; ++p) _mm512_store_si512(out + p * kTileK, r[p]);
  }
}

// Rows [n0, n0 + rows) (rows ≤ 16) of a Q8_0 matrix → one panel of B tiles holding q itself
// (an int8 is exact in BF16), laid out as PackPanelBf16 lays them out, and the panel's scales:
// d[16j + n] = the scale of row n0 + n in block j, as fp32 (zeros past `rows`).
// REQUIRES: K % 32 == 0 (the Q8_0 format).
void PackPanelQ8Unscaled(const MatrixView& W, int64_t n0, int64_t rows, uint16_t* b, float* d) {
  const int64_t K = W.cols, KB = K / kTileK;
  const int8_t* base = static_cast<const int8_t*>(W.data) + n0 * K;
  const uint16_t* scales = W.scales + n0 * KB;
  for (int64_t j = 0; j < KB; ++j) {
    __m512i r[16];
    for (int64_t n = 0; n < 16; ++n) {
      if (n >= rows) {
        r[n] = _mm512_setzero_si512();
        d[16 * j + n] = 0.0f;
        continue;
      }
      d[16 * j + n] = _cvtsh_ss(scales[n * KB + j]);
      const __m256i q =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + n * K + j * kTileK));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
      r[n] = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    }
    Transpose16x16(r);
    uint16_t* out = b + j * kTileElems;
    for (int p = 0; p < 16; ++p) _mm512_store_si512(out + p * kTileK, r[p]);
  }
}

// _tile_stored(t, ...) pastes t into the register name, so the tile must be a literal.
inline void StoreTile(int tile, void* base, int64_t stride) {
  switch (tile) {
    case 0:
      _tile_stored(0, base, stride);
      return;
    case 1:
      _tile_stored(1, base, stride);
      return;
    case 2:
      _tile_stored(2, base, stride);
      return;
    default:
      _tile_stored(3, base, stride);
      return;
  }
}

// Writes C tile `tile` (16 tokens × 16 rows) to y: straight from the tile when all of it is
// valid, otherwise through a buffer, only the `tokens` × `rows` valid part.
inline void StoreC(int tile, float* y, int64_t ldy, int64_t tokens, int64_t rows) {
  if (tokens == kTileRows && rows == 16) {
    StoreTile(tile, y, ldy * static_cast<int64_t>(sizeof(float)));
    return;
  }
  alignas(64) float c[kTileRows][16];
  StoreTile(tile, c, 64);
  const __mmask16 mask = FirstLanes(rows);
  for (int64_t t = 0; t < tokens; ++t)
    _mm512_mask_storeu_ps(y + t * ldy, mask, _mm512_load_ps(c[t]));
}

// MA (1-2) token tiles × NB (1-2) panels over KB blocks, P (1-3) activation parts each. a: the
// first token tile's block 0, token tiles a_step apart, the parts of a block 512 values apart;
// b: the first panel, panels b_step apart. C tile (m, n) is tmm 2m + n, A tiles tmm4-5, B tiles
// tmm6-7. `tokens[m]`, `rows[n]`: the valid part of each.
template <int MA, int NB, int P>
void TileKernel(const uint16_t* a, int64_t a_step, const uint16_t* b, int64_t b_step, int64_t KB,
                float* y, int64_t ldy, const int64_t tokens[2], const int64_t rows[2]) {
  _tile_zero(0);
  if constexpr (NB > 1) _tile_zero(1);
  if constexpr (MA > 1) _tile_zero(2);
  if constexpr (MA > 1 && NB > 1) _tile_zero(3);
  for (int64_t j = 0; j < KB; ++j) {
    const uint16_t* aj = a + j * P * kTileElems;
    _tile_loadd(6, b + j * kTileElems, 64);
    if constexpr (NB > 1) _tile_loadd(7, b + b_step + j * kTileElems, 64);
    // The parts in order hi, mid, lo: each partial sum of one activation's parts stays on its
    // side of the activation's product (file comment).
    for (int p = 0; p < P; ++p) {
      _tile_loadd(4, aj + p * kTileElems, 64);
      if constexpr (MA > 1) _tile_loadd(5, aj + a_step + p * kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (MA > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (MA > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  StoreC(0, y, ldy, tokens[0], rows[0]);
  if constexpr (NB > 1) StoreC(1, y + 16, ldy, tokens[0], rows[1]);
  if constexpr (MA > 1) StoreC(2, y + kTileRows * ldy, ldy, tokens[1], rows[0]);
  if constexpr (MA > 1 && NB > 1) StoreC(3, y + kTileRows * ldy + 16, ldy, tokens[1], rows[1]);
}

// TileKernel for Q8_0 at P ≥ 2: the B tiles hold q, and each 32-wide block's products (one
// Q8_0 block, one scale per row) go to C tiles of their own, which are stored and added into
// fp32 accumulators times the rows' scales: y = Σ_j d[n, j] · (Σ_{k in block j} x_k · q[n, k]),
// one FMA per block beyond the tiles' fp32 sums. d: the first panel's scales (16 per block),
// panels d_step apart.
template <int MA, int NB, int P>
void TileKernelScaled(const uint16_t* a, int64_t a_step, const uint16_t* b, int64_t b_step,
                      const float* d, int64_t d_step, int64_t KB, float* y, int64_t ldy,
                      const int64_t tokens[2], const int64_t rows[2]) {
  // acc[2m + n][t]: C tile (m, n)'s token t, its 16 rows; c: the block's C tiles as stored.
  alignas(64) float acc[4][kTileRows][16];
  alignas(64) float c[4][kTileRows][16];
  for (int tile = 0; tile < 4; ++tile)
    for (int64_t t = 0; t < kTileRows; ++t) _mm512_store_ps(acc[tile][t], _mm512_setzero_ps());
  for (int64_t j = 0; j < KB; ++j) {
    const uint16_t* aj = a + j * P * kTileElems;
    _tile_zero(0);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (MA > 1) _tile_zero(2);
    if constexpr (MA > 1 && NB > 1) _tile_zero(3);
    _tile_loadd(6, b + j * kTileElems, 64);
    if constexpr (NB > 1) _tile_loadd(7, b + b_step + j * kTileElems, 64);
    for (int p = 0; p < P; ++p) {
      _tile_loadd(4, aj + p * kTileElems, 64);
      if constexpr (MA > 1) _tile_loadd(5, aj + a_step + p * kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (MA > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (MA > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
    for (int m = 0; m < MA; ++m) {
      for (int n = 0; n < NB; ++n) {
        const int tile = 2 * m + n;
        StoreTile(tile, c[tile], 64);
        const __m512 scale = _mm512_loadu_ps(d + n * d_step + 16 * j);
        for (int64_t t = 0; t < kTileRows; ++t)
          _mm512_store_ps(acc[tile][t], _mm512_fmadd_ps(_mm512_load_ps(c[tile][t]), scale,
                                                        _mm512_load_ps(acc[tile][t])));
      }
    }
  }
  for (int m = 0; m < MA; ++m) {
    for (int n = 0; n < NB; ++n) {
      const __mmask16 mask = FirstLanes(rows[n]);
      float* out = y + m * kTileRows * ldy + 16 * n;
      for (int64_t t = 0; t < tokens[m]; ++t)
        _mm512_mask_storeu_ps(out + t * ldy, mask, _mm512_load_ps(acc[2 * m + n][t]));
    }
  }
}

// D: how weight panels are packed (kBF16: as stored; kQ8_0: dequantized to BF16 at P = 1, q and
// the scales apart at P ≥ 2); P: the activation parts. The A tiles come from `packed`
// (AmxPackActivations' layout) or, when it is null, from x, converted here.
template <DType D, int P>
void MatMulRowsTiles(const float* x, const uint16_t* packed, int64_t T, const MatrixView& W,
                     int64_t row_begin, int64_t row_end, float* y, int64_t ldy) {
  const int64_t K = W.cols, KB = (K + kTileK - 1) / kTileK;
  const int64_t token_tiles = (T + kTileRows - 1) / kTileRows;
  const int64_t a_step = KB * P * kTileElems, b_step = KB * kTileElems;
  uint16_t* scratch =
      packed == nullptr ? ActivationScratch(static_cast<size_t>(token_tiles * a_step)) : nullptr;
  const uint16_t* a = packed == nullptr ? scratch : packed;
  uint16_t* b = WeightScratch(static_cast<size_t>(kPanelsPerBlock * b_step));
  // Q8_0 at P ≥ 2: the panels' scales, 16 per block (after the panels, 64-byte aligned).
  constexpr bool kScaled = D == DType::kQ8_0 && P > 1;
  const int64_t d_step = KB * 16;
  float* d = kScaled ? ScaleScratch(static_cast<size_t>(kPanelsPerBlock * d_step)) : nullptr;
  ConfigureTiles();
  for (int64_t n0 = row_begin; n0 < row_end; n0 += kPanelsPerBlock * 16) {
    const int64_t block_rows =
        row_end - n0 < kPanelsPerBlock * 16 ? row_end - n0 : kPanelsPerBlock * 16;
    const int64_t panels = (block_rows + 15) / 16;
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t rows = block_rows - 16 * p < 16 ? block_rows - 16 * p : 16;
      if constexpr (kScaled)
        PackPanelQ8Unscaled(W, n0 + 16 * p, rows, b + p * b_step, d + p * d_step);
      else if constexpr (D == DType::kQ8_0)
        PackPanelQ8(W, n0 + 16 * p, rows, b + p * b_step);
      else
        PackPanelBf16(W, n0 + 16 * p, rows, b + p * b_step);
    }
    // Each pair of token tiles (A: 2 · P · K · 32 bytes, from L2) sweeps the packed panels.
    for (int64_t i = 0; i < token_tiles; i += 2) {
      // The activations are converted once per call, a pair of token tiles at a time as the
      // first block of panels reaches them, so the pair is still in L1/L2 for its tiles.
      if (n0 == row_begin && packed == nullptr)
        PackActivations(x, T, K, P, i, i + 2 < token_tiles ? i + 2 : token_tiles, scratch);
      const int64_t tokens[2] = {
          T - i * kTileRows < kTileRows ? T - i * kTileRows : kTileRows,
          T - (i + 1) * kTileRows < kTileRows ? T - (i + 1) * kTileRows : kTileRows};
      const bool two_a = i + 1 < token_tiles;
      for (int64_t p = 0; p < panels; p += 2) {
        const int64_t rows[2] = {block_rows - 16 * p < 16 ? block_rows - 16 * p : 16,
                                 block_rows - 16 * (p + 1) < 16 ? block_rows - 16 * (p + 1) : 16};
        const bool two_b = p + 1 < panels;
        const uint16_t* ap = a + i * a_step;
        const uint16_t* bp = b + p * b_step;
        float* yp = y + i * kTileRows * ldy + n0 + 16 * p;
        if constexpr (kScaled) {
          const float* dp = d + p * d_step;
          if (two_a && two_b) {
            TileKernelScaled<2, 2, P>(ap, a_step, bp, b_step, dp, d_step, KB, yp, ldy, tokens,
                                      rows);
          } else if (two_a) {
            TileKernelScaled<2, 1, P>(ap, a_step, bp, b_step, dp, d_step, KB, yp, ldy, tokens,
                                      rows);
          } else if (two_b) {
            TileKernelScaled<1, 2, P>(ap, a_step, bp, b_step, dp, d_step, KB, yp, ldy, tokens,
                                      rows);
          } else {
            TileKernelScaled<1, 1, P>(ap, a_step, bp, b_step, dp, d_step, KB, yp, ldy, tokens,
                                      rows);
          }
          continue;
        }
        if (two_a && two_b) {
          TileKernel<2, 2, P>(ap, a_step, bp, b_step, KB, yp, ldy, tokens, rows);
        } else if (two_a) {
          TileKernel<2, 1, P>(ap, a_step, bp, b_step, KB, yp, ldy, tokens, rows);
        } else if (two_b) {
          TileKernel<1, 2, P>(ap, a_step, bp, b_step, KB, yp, ldy, tokens, rows);
        } else {
          TileKernel<1, 1, P>(ap, a_step, bp, b_step, KB, yp, ldy, tokens, rows);
        }
      }
    }
  }
  // Back to the init state: the kernel then need not save 8 KiB of tiles at context switches.
  _tile_release();
}

// ---- The transposed orientation, C^T = W · X^T (AmxLayout::kWeightTiles) ----

// Token tiles [i0, i1) of x as B tiles: tile (i, j, part) — at the place PackActivations gives
// A tile (i, j, part) — holds at row q, column t the pair of x[16i + t, 32j + 2q … 2q + 1]'s
// part: the A tile read as 16 × 16 32-bit pairs and transposed.
void PackActivationsTransposed(const float* x, int64_t T, int64_t K, int parts, int64_t i0,
                               int64_t i1, uint16_t* b) {
  PackActivations(x, T, K, parts, i0, i1, b);
  const int64_t KB = (K + kTileK - 1) / kTileK;
  for (int64_t i = i0; i < i1; ++i) {
    uint16_t* tiles = b + i * KB * parts * kTileElems;
    for (int64_t tile = 0; tile < KB * parts; ++tile) {
      uint16_t* t = tiles + tile * kTileElems;
      __m512i r[16];
      for (int q = 0; q < 16; ++q) r[q] = _mm512_loadu_si512(t + q * kTileK);
      Transpose16x16(r);
      for (int q = 0; q < 16; ++q) _mm512_storeu_si512(t + q * kTileK, r[q]);
    }
  }
}

// Where a panel of 16 weight rows is read as A tiles (16 rows × 32 BF16 per block): `data`,
// rows `stride` bytes apart; d: Q8_0 scales, 16 per block (null for BF16).
struct PanelSource {
  const uint16_t* data;
  int64_t stride;
  const float* d;
};

// Values between the rows of a panel copied to scratch: one cache line more than the rows, so
// that the 16 rows of a tile do not all fall in one L1 set (K = 2048 BF16 is 4 KiB a row).
inline int64_t PanelStride(int64_t KB) { return KB * kTileK + kTileK; }

// Rows [n0, n0 + rows) of W as A tiles. BF16 with 16 rows inside the matrix and K a multiple of
// 32: the matrix itself, no copy (rows past `rows` are read and their results dropped). Else a
// copy into `scratch` (16 × KB·32 values, zeros past `rows` and K): BF16 as stored, Q8_0 as q
// widened to BF16 (exact), its scales into `d` (zeros past `rows`).
template <DType D>
PanelSource LoadPanel(const MatrixView& W, int64_t n0, int64_t rows, uint16_t* scratch, float* d) {
  const int64_t K = W.cols, KB = (K + kTileK - 1) / kTileK, stride = PanelStride(KB);
  if constexpr (D == DType::kBF16) {
    const uint16_t* base = static_cast<const uint16_t*>(W.data) + n0 * K;
    // Read in place unless the rows are 4 KiB apart or a multiple of it: a tile's 16 rows would
    // then share one L1 set (12 ways), and sweeps after the first reread them from L2 slower
    // than a copy costs (bench/bench_amx.cc, K = 2048: 5-15% faster with the copy).
    const int64_t pitch = K * static_cast<int64_t>(sizeof(uint16_t));
    if (K % kTileK == 0 && n0 + 16 <= W.rows && pitch % 4096 != 0)
      return {base, K * static_cast<int64_t>(sizeof(uint16_t)), nullptr};
    for (int64_t n = 0; n < 16; ++n) {
      for (int64_t j = 0; j < KB; ++j) {
        const int64_t left = K - j * kTileK;
        const __mmask32 mask = n >= rows        ? 0
                               : left >= kTileK ? static_cast<__mmask32>(0xffffffffu)
                                                : static_cast<__mmask32>((1u << left) - 1);
        _mm512_store_si512(scratch + n * stride + j * kTileK,
                           _mm512_maskz_loadu_epi16(mask, base + n * K + j * kTileK));
      }
    }
    return {scratch, stride * static_cast<int64_t>(sizeof(uint16_t)), nullptr};
  } else {
    const int8_t* base = static_cast<const int8_t*>(W.data) + n0 * K;
    const uint16_t* scales = W.scales + n0 * KB;
    for (int64_t n = 0; n < 16; ++n) {
      for (int64_t j = 0; j < KB; ++j) {
        __m512i w = _mm512_setzero_si512();
        if (n < rows) {
          const __m256i q =
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(base + n * K + j * kTileK));
          const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(q)));
          const __m512 hi =
              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(q, 1)));
          w = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        }
        _mm512_store_si512(scratch + n * stride + j * kTileK, w);
        d[16 * j + n] = n < rows ? _cvtsh_ss(scales[n * KB + j]) : 0.0f;
      }
    }
    return {scratch, stride * static_cast<int64_t>(sizeof(uint16_t)), d};
  }
}

// Writes a C^T tile c [16 weight rows][16 tokens] to y [token, row]: transposed in registers,
// only the `tokens` × `rows` valid part.
inline void StoreTransposed(const float c[16][16], float* y, int64_t ldy, int64_t tokens,
                            int64_t rows) {
  __m512i r[16];
  for (int n = 0; n < 16; ++n) r[n] = _mm512_load_si512(c[n]);
  Transpose16x16(r);
  const __mmask16 mask = FirstLanes(rows);
  for (int64_t t = 0; t < tokens; ++t)
    _mm512_mask_storeu_ps(y + t * ldy, mask, _mm512_castsi512_ps(r[t]));
}

// MA (1-2) weight panels × NB (1-2) token tiles over KB blocks, P activation parts: C^T tile
// (m, n) is tmm 2m + n, the weight A tiles tmm4-5, the activation B tiles tmm6-7 (each block's
// P parts in order hi, mid, lo, as in TileKernel). b: the first token tile's block 0, token
// tiles b_step apart. y: the first token's first row. kScaled (Q8_0): each block's products go
// to fresh tiles, added into fp32 accumulators times their rows' scales, as TileKernelScaled
// does but with a scale per row of C^T (a broadcast) instead of per column.
template <int MA, int NB, int P, bool kScaled>
void TileKernelT(const PanelSource w[2], const uint16_t* b, int64_t b_step, int64_t KB, float* y,
                 int64_t ldy, const int64_t rows[2], const int64_t tokens[2]) {
  alignas(64) float c[4][16][16];
  alignas(64) float acc[4][16][16];  // kScaled only
  if constexpr (kScaled) {
    for (int tile = 0; tile < 4; ++tile)
      for (int n = 0; n < 16; ++n) _mm512_store_ps(acc[tile][n], _mm512_setzero_ps());
  }
  auto zero = [] {
    _tile_zero(0);
    if constexpr (NB > 1) _tile_zero(1);
    if constexpr (MA > 1) _tile_zero(2);
    if constexpr (MA > 1 && NB > 1) _tile_zero(3);
  };
  if constexpr (!kScaled) zero();
  for (int64_t j = 0; j < KB; ++j) {
    if constexpr (kScaled) zero();
    _tile_loadd(4, w[0].data + j * kTileK, w[0].stride);
    if constexpr (MA > 1) _tile_loadd(5, w[1].data + j * kTileK, w[1].stride);
    const uint16_t* bj = b + j * P * kTileElems;
    for (int p = 0; p < P; ++p) {
      _tile_loadd(6, bj + p * kTileElems, 64);
      if constexpr (NB > 1) _tile_loadd(7, bj + b_step + p * kTileElems, 64);
      _tile_dpbf16ps(0, 4, 6);
      if constexpr (NB > 1) _tile_dpbf16ps(1, 4, 7);
      if constexpr (MA > 1) _tile_dpbf16ps(2, 5, 6);
      if constexpr (MA > 1 && NB > 1) _tile_dpbf16ps(3, 5, 7);
    }
    if constexpr (kScaled) {
      for (int m = 0; m < MA; ++m) {
        for (int n = 0; n < NB; ++n) {
          const int tile = 2 * m + n;
          StoreTile(tile, c[tile], 64);
          const float* d = w[m].d + 16 * j;
          for (int r = 0; r < 16; ++r)
            _mm512_store_ps(acc[tile][r],
                            _mm512_fmadd_ps(_mm512_load_ps(c[tile][r]), _mm512_set1_ps(d[r]),
                                            _mm512_load_ps(acc[tile][r])));
        }
      }
    }
  }
  for (int m = 0; m < MA; ++m) {
    for (int n = 0; n < NB; ++n) {
      const int tile = 2 * m + n;
      float* out = y + n * kTileRows * ldy + 16 * m;
      if constexpr (kScaled) {
        StoreTransposed(acc[tile], out, ldy, tokens[n], rows[m]);
      } else {
        StoreTile(tile, c[tile], 64);
        StoreTransposed(c[tile], out, ldy, tokens[n], rows[m]);
      }
    }
  }
}

// MatMulRowsTiles in the transposed orientation, from activations packed by
// PackActivationsTransposed: weight rows are A tiles read in place (BF16) or widened without a
// transpose (Q8_0: q, the scales applied per block), so nothing is transposed per call but
// the C^T tiles, once per full K. Two panels (32 rows) at a time, swept by every pair of token
// tiles (the panels stay in L2 after the first pair).
template <DType D, int P>
void MatMulRowsTransposed(const uint16_t* packed, int64_t T, const MatrixView& W, int64_t row_begin,
                          int64_t row_end, float* y, int64_t ldy) {
  constexpr bool kScaled = D == DType::kQ8_0;
  const int64_t K = W.cols, KB = (K + kTileK - 1) / kTileK;
  const int64_t token_tiles = (T + kTileRows - 1) / kTileRows;
  const int64_t b_step = KB * P * kTileElems, panel_elems = 16 * PanelStride(KB);
  const int64_t group = kPanelsPerBlock;
  uint16_t* scratch = WeightScratch(static_cast<size_t>(group * panel_elems));
  float* d = kScaled ? ScaleScratch(static_cast<size_t>(group * 16 * KB)) : nullptr;
  ConfigureTiles();
  PanelSource w[kPanelsPerBlock * 4];
  int64_t rows[kPanelsPerBlock * 4 + 1];
  for (int64_t g0 = row_begin; g0 < row_end; g0 += group * 16) {
    const int64_t group_rows = row_end - g0 < group * 16 ? row_end - g0 : group * 16;
    const int64_t panels = (group_rows + 15) / 16;
    for (int64_t p = 0; p < panels; ++p) {
      rows[p] = group_rows - 16 * p < 16 ? group_rows - 16 * p : 16;
      w[p] = LoadPanel<D>(W, g0 + 16 * p, rows[p], scratch + p * panel_elems,
                          kScaled ? d + p * 16 * KB : nullptr);
    }
    rows[panels] = 0;
    for (int64_t i = 0; i < token_tiles; i += 2) {
      const int64_t tokens[2] = {
          T - i * kTileRows < kTileRows ? T - i * kTileRows : kTileRows,
          T - (i + 1) * kTileRows < kTileRows ? T - (i + 1) * kTileRows : kTileRows};
      const bool two_b = i + 1 < token_tiles;
      const uint16_t* bp = packed + i * b_step;
      for (int64_t p = 0; p < panels; p += 2) {
        const bool two_a = p + 1 < panels;
        float* yp = y + i * kTileRows * ldy + g0 + 16 * p;
        if (two_a && two_b) {
          TileKernelT<2, 2, P, kScaled>(w + p, bp, b_step, KB, yp, ldy, rows + p, tokens);
        } else if (two_a) {
          TileKernelT<2, 1, P, kScaled>(w + p, bp, b_step, KB, yp, ldy, rows + p, tokens);
        } else if (two_b) {
          TileKernelT<1, 2, P, kScaled>(w + p, bp, b_step, KB, yp, ldy, rows + p, tokens);
        } else {
          TileKernelT<1, 1, P, kScaled>(w + p, bp, b_step, KB, yp, ldy, rows + p, tokens);
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

bool AmxUsable() {
  static const bool usable = ProbeAndLog();
  return usable;
}

bool AmxSupports(DType dtype, AmxPrecision precision) {
  const int parts = static_cast<int>(precision);
  if (parts < 1 || parts > 3) return false;
  return dtype == DType::kBF16 || dtype == DType::kQ8_0;
}

namespace {
template <DType D, int P>
void MatMulRowsAnyLayout(const float* x, const uint16_t* packed, int64_t T, const MatrixView& W,
                         int64_t row_begin, int64_t row_end, float* y, int64_t ldy,
                         AmxLayout layout) {
  if (packed != nullptr && layout == AmxLayout::kWeightTiles)
    MatMulRowsTransposed<D, P>(packed, T, W, row_begin, row_end, y, ldy);
  else
    MatMulRowsTiles<D, P>(x, packed, T, W, row_begin, row_end, y, ldy);
}

template <DType D>
void MatMulRowsAnyPrecision(const float* x, const uint16_t* packed, int64_t T, const MatrixView& W,
                            int64_t row_begin, int64_t row_end, float* y, int64_t ldy,
                            AmxPrecision precision, AmxLayout layout) {
  switch (precision) {
    case AmxPrecision::kBf16:
      MatMulRowsAnyLayout<D, 1>(x, packed, T, W, row_begin, row_end, y, ldy, layout);
      return;
    case AmxPrecision::kBf16x2:
      MatMulRowsAnyLayout<D, 2>(x, packed, T, W, row_begin, row_end, y, ldy, layout);
      return;
    case AmxPrecision::kExact:
      MatMulRowsAnyLayout<D, 3>(x, packed, T, W, row_begin, row_end, y, ldy, layout);
      return;
  }
}

void MatMulRowsAny(const float* x, const uint16_t* packed, int64_t T, const MatrixView& W,
                   int64_t row_begin, int64_t row_end, float* y, int64_t ldy,
                   AmxPrecision precision, AmxLayout layout) {
  if (T <= 0 || row_begin >= row_end || !AmxSupports(W.dtype, precision)) return;
  if (layout != AmxLayout::kTokenTiles && layout != AmxLayout::kWeightTiles) return;
  if (W.dtype == DType::kBF16) {
    MatMulRowsAnyPrecision<DType::kBF16>(x, packed, T, W, row_begin, row_end, y, ldy, precision,
                                         layout);
  } else if (W.dtype == DType::kQ8_0 && W.cols % kQ8Block == 0) {
    MatMulRowsAnyPrecision<DType::kQ8_0>(x, packed, T, W, row_begin, row_end, y, ldy, precision,
                                         layout);
  }
}
}  // namespace

void AmxMatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                   int64_t row_end, float* y, int64_t ldy, AmxPrecision precision) {
  MatMulRowsAny(x, nullptr, T, W, row_begin, row_end, y, ldy, precision, AmxLayout::kTokenTiles);
}

int64_t AmxPackedActivationsSize(int64_t T, int64_t K, AmxPrecision precision) {
  const int parts = static_cast<int>(precision);
  if (T <= 0 || K <= 0 || parts < 1 || parts > 3) return 0;
  return (T + kTileRows - 1) / kTileRows * ((K + kTileK - 1) / kTileK) * parts * kTileElems;
}

void AmxPackActivations(const float* x, int64_t T, int64_t K, uint16_t* packed,
                        AmxPrecision precision, AmxLayout layout) {
  const int parts = static_cast<int>(precision);
  if (T <= 0 || K <= 0 || parts < 1 || parts > 3) return;
  if (layout == AmxLayout::kWeightTiles)
    PackActivationsTransposed(x, T, K, parts, 0, (T + kTileRows - 1) / kTileRows, packed);
  else if (layout == AmxLayout::kTokenTiles)
    PackActivations(x, T, K, parts, 0, (T + kTileRows - 1) / kTileRows, packed);
}

void AmxMatMulRowsPacked(const uint16_t* packed, int64_t T, const MatrixView& W, int64_t row_begin,
                         int64_t row_end, float* y, int64_t ldy, AmxPrecision precision,
                         AmxLayout layout) {
  MatMulRowsAny(nullptr, packed, T, W, row_begin, row_end, y, ldy, precision, layout);
}

#else  // not x86-64: no AMX

bool AmxUsable() { return false; }
bool AmxSupports(DType, AmxPrecision) { return false; }
void AmxMatMulRows(const float*, int64_t, const MatrixView&, int64_t, int64_t, float*, int64_t,
                   AmxPrecision) {}
int64_t AmxPackedActivationsSize(int64_t, int64_t, AmxPrecision) { return 0; }
void AmxPackActivations(const float*, int64_t, int64_t, uint16_t*, AmxPrecision, AmxLayout) {}
void AmxMatMulRowsPacked(const uint16_t*, int64_t, const MatrixView&, int64_t, int64_t, float*,
                         int64_t, AmxPrecision, AmxLayout) {}

#endif

}  // namespace dsmoe::ops
