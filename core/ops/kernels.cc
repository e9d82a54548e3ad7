#include "core/ops/kernels.h"

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "core/ops/cpu/amx_gemm.h"
#include "core/util/cpu_features.h"
#include "core/util/log.h"

namespace dsmoe::ops {

namespace {

// Batches from this many tokens on go to AMX tiles: a tile holds 16 tokens.
constexpr int64_t kAmxMinTokens = 16;

// The avx512 table's matmul, with batches of BF16 and Q8_0 weights on AMX tiles in exact mode
// (activations split into three BF16 parts, so results equal the fp32 kernels' to fp32
// rounding: batching still changes no result beyond that; see amx_gemm.h).
void AmxBatchMatMulRows(const float* x, int64_t T, const MatrixView& W, int64_t row_begin,
                        int64_t row_end, float* y, int64_t ldy) {
  if (T >= kAmxMinTokens && AmxSupports(W.dtype, AmxPrecision::kExact)) {
    AmxMatMulRows(x, T, W, row_begin, row_end, y, ldy, AmxPrecision::kExact);
  } else {
    Avx512Kernels()->matmul_rows(x, T, W, row_begin, row_end, y, ldy);
  }
}

// Up to this many tokens, prepared batches use the transposed orientation (AmxLayout::
// kWeightTiles: weight rows read in place, or copied or widened without a transposition);
// beyond, x as A tiles and the weights transposed into B tiles per call, which shares each
// packed block among more token tiles. Measured with bench/bench_amx.cc (exact mode, one
// thread, DeepSeekMoE 16B's shapes, a shared machine: ±10% between runs): BF16 weight tiles
// were up to 1.4x faster at 16 tokens, level with the other from 48 on (0.85-1.05); Q8_0's
// (whose other orientation widens and transposes q per call) 1.03-1.25x up to 256 tokens,
// level at 512 (0.96-1.09).
int64_t WeightTilesMaxTokens(DType dtype) { return dtype == DType::kQ8_0 ? 256 : 48; }

AmxLayout PreparedLayout(int64_t T, DType dtype) {
  return T <= WeightTilesMaxTokens(dtype) ? AmxLayout::kWeightTiles : AmxLayout::kTokenTiles;
}

// Prepared activations for the AMX tiles: x split into its three exact BF16 parts and laid out
// as tiles once per matrix (AmxPackActivations) in the orientation PreparedLayout picks, for
// batches AmxBatchMatMulRows sends to AMX.
int64_t AmxPreparedSize(int64_t T, int64_t K, DType dtype) {
  if (T < kAmxMinTokens || !AmxSupports(dtype, AmxPrecision::kExact)) return 0;
  return AmxPackedActivationsSize(T, K, AmxPrecision::kExact) *
         static_cast<int64_t>(sizeof(uint16_t));
}

void AmxPrepare(const float* x, int64_t T, int64_t K, DType dtype, int64_t t0, int64_t t1,
                void* prepared) {
  // Tiles hold 16 tokens in order, so tokens from t0 (a multiple of 16) start where the packed
  // size of the first t0 tokens ends.
  AmxPackActivations(
      x + t0 * K, t1 - t0, K,
      static_cast<uint16_t*>(prepared) + AmxPackedActivationsSize(t0, K, AmxPrecision::kExact),
      AmxPrecision::kExact, PreparedLayout(T, dtype));
}

void AmxMatMulRowsPrepared(const void* prepared, int64_t T, const MatrixView& W, int64_t row_begin,
                           int64_t row_end, float* y, int64_t ldy) {
  AmxMatMulRowsPacked(static_cast<const uint16_t*>(prepared), T, W, row_begin, row_end, y, ldy,
                      AmxPrecision::kExact, PreparedLayout(T, W.dtype));
}

}  // namespace

const KernelTable* Avx512AmxKernels() {
  if (Avx512Kernels() == nullptr) return nullptr;
  static const KernelTable table = [] {
    KernelTable t = *Avx512Kernels();
    t.name = "amx";
    t.matmul_rows = &AmxBatchMatMulRows;
    t.prepared_size = &AmxPreparedSize;
    t.prepare = &AmxPrepare;
    t.matmul_rows_prepared = &AmxMatMulRowsPrepared;
    return t;
  }();
  return &table;
}

const KernelTable* KernelsNamed(std::string_view name) {
  const CpuFeatures& cpu = GetCpuFeatures();
  if (name == "reference") return &ReferenceKernels();
  if (name == "avx2") return cpu.HasAvx2Kernels() ? Avx2Kernels() : nullptr;
  if (name == "avx512") return cpu.HasAvx512Kernels() ? Avx512Kernels() : nullptr;
  if (name == "amx") return cpu.HasAvx512Kernels() && AmxUsable() ? Avx512AmxKernels() : nullptr;
  if (name == "avx512bf16") return cpu.HasAvx512Kernels() ? Avx512Bf16DotKernels() : nullptr;
  return nullptr;
}

const KernelTable& ChooseKernels(const char* forced, Logger& logger) {
  const KernelTable* best = nullptr;
  // Only tables whose results match the reference to fp32 rounding are chosen by themselves:
  // dsmoe promises that batching changes no token (a batched stream equals its single-stream
  // run), and a table that rounds activations to BF16 from some batch size on breaks that.
  // avx512bf16 (`vdpbf16ps`, BF16 activations from 48 tokens) is there to be asked for, as
  // DSMOE_KERNELS=avx512bf16, where its speed matters more (it measured slower than widening
  // on this project's Xeon; AMD Zen 4 is the machine where it may pay).
  for (const char* name : {"amx", "avx512", "avx2"}) {
    if ((best = KernelsNamed(name)) != nullptr) break;
  }
  if (best == nullptr) best = &ReferenceKernels();
  if (forced == nullptr || *forced == '\0') return *best;
  if (const KernelTable* table = KernelsNamed(forced)) return *table;
  // A typo or a table this CPU lacks must not stop a server; say so and run the best.
  const std::string_view name = forced;
  const bool known = name == "reference" || name == "avx2" || name == "avx512" || name == "amx" ||
                     name == "avx512bf16";
  logger.Log(LogLevel::kWarning,
             absl::StrCat("DSMOE_KERNELS=", forced, ": ",
                          known ? "this CPU cannot run that table"
                                : "not one of reference|avx2|avx512|amx|avx512bf16",
                          " (CPU: ", GetCpuFeatures().ToString(), "); using ", best->name));
  return *best;
}

const KernelTable& Kernels() {
  static const KernelTable& chosen = ChooseKernels(std::getenv("DSMOE_KERNELS"), *DefaultLogger());
  return chosen;
}

}  // namespace dsmoe::ops
