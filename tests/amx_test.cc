// The AMX GEMM against references written here: exact (double) products of the fp32 activations
// (exact mode) or of the BF16-rounded ones (fast mode), and the scalar reference kernel, on
// every token count 1-100 and 512, K on and off the 32-wide tile blocks, row ranges that start
// and end inside 16-row panels; the exact mode's edge values against hand-worked results. Every
// check runs both orientations (x as A tiles, and x packed as B tiles for yᵀ = W·xᵀ) and, in
// exact mode, the amx table's prepared hooks; ops::Linear and RunMlps with the amx table are
// checked against the same calls with the reference table.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "core/model/mlp.h"
#include "core/model/quantize.h"
#include "core/ops/cpu/amx_gemm.h"
#include "core/ops/kernels.h"
#include "core/ops/ops.h"
#include "core/tensor/dtype.h"
#include "core/util/thread_pool.h"
#include "tests/test_util.h"

namespace dsmoe {
namespace {

using ops::AmxPrecision;
using testing::RandomFloats;

const char* Name(AmxPrecision precision) {
  switch (precision) {
    case AmxPrecision::kBf16:
      return "kBf16";
    case AmxPrecision::kBf16x2:
      return "kBf16x2";
    case AmxPrecision::kExact:
      return "kExact";
  }
  return "?";
}

constexpr AmxPrecision kAllPrecisions[] = {AmxPrecision::kExact, AmxPrecision::kBf16x2,
                                           AmxPrecision::kBf16};

// Unit roundoff of fp32 (round to nearest): each fp32 addition errs by at most u·|result|.
constexpr double kU = 1.0 / (1 << 24);
// Relative rounding error of BF16 (8 significant bits, round to nearest even): ≤ 2^-8 (the
// measured worst case in these tests is 0.82 of the bound below, a single product at K = 1).
constexpr double kBf16Rel = 1.0 / 256;
// kBf16x2's promise: each activation to within 2^-15 of itself.
constexpr double kBf16x2Rel = 1.0 / (1 << 15);

// Weights [N, K] as the kernel reads them, and the values it multiplies: BF16 as stored; Q8_0
// dequantized (q · d, exact in fp32) and rounded to BF16 in the fast mode (kBf16), q · d itself
// in the others (q in the tiles, d applied per block in fp32).
struct TestMatrix {
  std::vector<uint8_t> bytes;
  std::vector<uint16_t> scales;
  std::vector<float> used;  // what the tiles multiply in the fast mode, as fp32
  std::vector<float> real;  // the matrix's own values (W.At): what the other modes multiply
  double weight_rounding;   // relative error of `used` against `real`
  MatrixView view;
};

TestMatrix MakeBf16(int64_t N, int64_t K, uint64_t seed) {
  TestMatrix m;
  const std::vector<float> v = RandomFloats(N * K, seed);
  m.bytes.resize(2 * N * K);
  m.used.resize(N * K);
  for (int64_t i = 0; i < N * K; ++i) {
    const uint16_t h = F32ToBf16(v[i]);
    std::memcpy(m.bytes.data() + 2 * i, &h, 2);
    m.used[i] = Bf16ToF32(h);
  }
  m.real = m.used;
  m.weight_rounding = 0;
  m.view = MatrixView{DType::kBF16, N, K, m.bytes.data()};
  return m;
}

TestMatrix MakeQ8(int64_t N, int64_t K, uint64_t seed) {  // K a multiple of 32
  TestMatrix m;
  const std::vector<float> v = RandomFloats(N * K, seed);
  m.bytes.resize(N * K);
  m.scales.resize(N * K / kQ8Block);
  for (int64_t r = 0; r < N; ++r) {
    QuantizeRowQ8(v.data() + r * K, K, reinterpret_cast<int8_t*>(m.bytes.data()) + r * K,
                  m.scales.data() + r * (K / kQ8Block));
  }
  m.used.resize(N * K);
  m.real.resize(N * K);
  for (int64_t r = 0; r < N; ++r) {
    for (int64_t k = 0; k < K; ++k) {
      const float q = static_cast<float>(static_cast<int8_t>(m.bytes[r * K + k]));
      m.real[r * K + k] = q * F16ToF32(m.scales[r * (K / kQ8Block) + k / kQ8Block]);
      m.used[r * K + k] = Bf16ToF32(F32ToBf16(m.real[r * K + k]));
    }
  }
  m.weight_rounding = kBf16Rel;
  m.view = MatrixView{DType::kQ8_0, N, K, m.bytes.data(), m.scales.data()};
  return m;
}

// Runs the AMX GEMM at `precision` on rows [r0, r1) of W with y rows ldy apart, three ways
// (below), and checks every element of each:
//   - inside the range, against the exact sum in double of what the tiles are to multiply:
//     kExact: x as given (fp32), times `real`; kBf16: bf16(x) (round to nearest even) times
//     `used`; kBf16x2: x times `real`, give or take Σ_k |x_k·real[n,k]|·2^-15. TDPBF16PS
//     multiplies exactly and adds each product into an fp32 accumulator, so beyond that its
//     error is the error of a running fp32 sum: each addition errs by at most u·|s_i| (s_i the
//     partial sum after i terms). Those errors are independent and of mean zero, of variance
//     ≤ (u·s_i)²/3, so the total has a standard deviation ≤ u·sqrt(Σ s_i² / 3): the tolerance is
//     8 such deviations, which no element of these tests should exceed by chance — and a wrong
//     tail, a wrong pair order, a missing block or a lost part is off by whole products (or
//     2^-8 of them), orders of magnitude more. kBf16 adds the K products in the order of k (the
//     partial sums are taken so). With P parts (kBf16x2: 2, kExact: 3) there are P·K additions,
//     a 32-wide block's P parts one after the other: every partial sum is the sum before the
//     block plus some of the block's part products, and the parts have their activation's sign
//     and sum to at most its magnitude, so |s_i| ≤ M = max over blocks of |sum before it| +
//     Σ_{k in it} |x_k·real[n,k]|, and the deviation ≤ u·M·sqrt(P·K/3). Q8_0 at P ≥ 2 sums
//     each block in a C tile of its own (in units of the block's scale d, the same bound once
//     times d) and adds d·C into the output with one FMA per block, whose partial sums are
//     bounded by M too: P·K + K/32 roundings;
//   - inside the range, against ReferenceKernels().matmul_rows (fp32 x). kExact: with the
//     tolerance tests/kernels_test.cc gives the AVX2 kernel against it, 1e-5·(1 + sqrt(K)),
//     scaled by max|x_t|·max|W_n| (that test's values are within ±1, these are not); the
//     others: they differ by the rounding of x (≤ Σ_k |x_k·W[n,k]| times 2^-8 or 2^-15), the
//     same again for Q8_0's weights (rounded to BF16), plus both fp32 sums' rounding (each
//     ≤ K·u·Σ_k |x_k·W[n,k]|);
//   - outside it (other rows, and the ldy padding), untouched.
void CheckAmx(const TestMatrix& W, int64_t T, int64_t r0, int64_t r1, int64_t ldy, uint64_t seed,
              AmxPrecision precision) {
  const int64_t K = W.view.cols;
  const std::vector<float> x = RandomFloats(T * K, seed, 2.0f);
  constexpr float kSentinel = -12345.0f;
  std::vector<float> ref(T * ldy, kSentinel);
  ops::ReferenceKernels().matmul_rows(x.data(), T, W.view, r0, r1, ref.data(), ldy);
  // Three ways in: x converted by the call; x packed beforehand, in two slices split at a
  // 16-token boundary as threads may pack it; and the range split into 8-row chunks over two
  // threads, as ops::Linear splits a matrix (each thread its own tile state and scratch).
  struct Result {
    const char* how;
    std::vector<float> y;
  };
  std::vector<Result> results;
  results.push_back({"x converted by the call", std::vector<float>(T * ldy, kSentinel)});
  ops::AmxMatMulRows(x.data(), T, W.view, r0, r1, results.back().y.data(), ldy, precision);

  results.push_back({"x packed beforehand", std::vector<float>(T * ldy, kSentinel)});
  std::vector<uint16_t> packed(ops::AmxPackedActivationsSize(T, K, precision), 0xffff);
  const int64_t split = T / 32 * 16;
  ops::AmxPackActivations(x.data(), split, K, packed.data(), precision);
  ops::AmxPackActivations(x.data() + split * K, T - split, K,
                          packed.data() + ops::AmxPackedActivationsSize(split, K, precision),
                          precision);
  ops::AmxMatMulRowsPacked(packed.data(), T, W.view, r0, r1, results.back().y.data(), ldy,
                           precision);

  // The transposed orientation (AmxLayout::kWeightTiles: x packed as B tiles, yᵀ = W·xᵀ), from
  // x packed in the same two slices. Its Q8_0 weights are q times d at every precision, so at
  // kBf16 (where the checks below expect weights rounded to BF16) Q8_0 is checked in
  // WeightTilesQ8FastModeMultipliesExactWeights instead.
  if (!(precision == AmxPrecision::kBf16 && W.view.dtype == DType::kQ8_0)) {
    results.push_back(
        {"weight tiles, x packed transposed", std::vector<float>(T * ldy, kSentinel)});
    std::vector<uint16_t> packed_t(ops::AmxPackedActivationsSize(T, K, precision), 0xffff);
    ops::AmxPackActivations(x.data(), split, K, packed_t.data(), precision,
                            ops::AmxLayout::kWeightTiles);
    ops::AmxPackActivations(x.data() + split * K, T - split, K,
                            packed_t.data() + ops::AmxPackedActivationsSize(split, K, precision),
                            precision, ops::AmxLayout::kWeightTiles);
    ops::AmxMatMulRowsPacked(packed_t.data(), T, W.view, r0, r1, results.back().y.data(), ldy,
                             precision, ops::AmxLayout::kWeightTiles);
  }

  results.push_back({"8-row chunks on 2 threads", std::vector<float>(T * ldy, kSentinel)});
  static ThreadPool pool(2);
  float* chunked = results.back().y.data();
  pool.ParallelFor((r1 - r0 + 7) / 8, [&](int64_t task, int) {
    const int64_t c0 = r0 + 8 * task, c1 = std::min(r1, c0 + 8);
    ops::AmxMatMulRows(x.data(), T, W.view, c0, c1, chunked, ldy, precision);
  });

  // Exact mode only: the amx table's hooks (KernelTable::prepare, matmul_rows_prepared), x
  // prepared in 16-token slices by two threads in reverse order, rows in 8-row chunks. They
  // prepare nothing below 16 tokens (the table's matmul_rows then leaves AMX).
  if (precision == AmxPrecision::kExact) {
    const ops::KernelTable& amx = *ops::Avx512AmxKernels();
    const int64_t bytes = amx.prepared_size(T, K, W.view.dtype);
    if (T < 16) {
      EXPECT_EQ(bytes, 0) << "T=" << T;
    } else {
      results.push_back({"the amx table's prepared hooks", std::vector<float>(T * ldy, kSentinel)});
      std::vector<uint64_t> prepared((bytes + 7) / 8, ~uint64_t{0});
      const int64_t slices = (T + 15) / 16;
      pool.ParallelFor(slices, [&](int64_t task, int) {
        const int64_t t0 = 16 * (slices - 1 - task);
        amx.prepare(x.data(), T, K, W.view.dtype, t0, std::min(T, t0 + 16), prepared.data());
      });
      float* out = results.back().y.data();
      pool.ParallelFor((r1 - r0 + 7) / 8, [&](int64_t task, int) {
        const int64_t c0 = r0 + 8 * task, c1 = std::min(r1, c0 + 8);
        amx.matmul_rows_prepared(prepared.data(), T, W.view, c0, c1, out, ldy);
      });
    }
  }

  const int parts = static_cast<int>(precision);
  const double x_rel = precision == AmxPrecision::kBf16x2 ? kBf16x2Rel : 0;
  const bool fast = precision == AmxPrecision::kBf16;
  const std::vector<float>& used = fast ? W.used : W.real;
  const double weight_rounding = fast ? W.weight_rounding : 0;
  const double roundings =
      parts * static_cast<double>(K) + (W.view.dtype == DType::kQ8_0 ? K / 32 : 0);
  std::vector<double> xb(K);
  for (int64_t t = 0; t < T; ++t) {
    double x_max = 0;
    for (int64_t k = 0; k < K; ++k) {
      const float v = x[t * K + k];
      xb[k] = precision == AmxPrecision::kBf16 ? Bf16ToF32(F32ToBf16(v)) : v;
      x_max = std::max(x_max, std::fabs(static_cast<double>(v)));
    }
    for (int64_t n = 0; n < ldy; ++n) {
      if (n < r0 || n >= r1) {
        for (const Result& r : results)
          ASSERT_EQ(r.y[t * ldy + n], kSentinel)
              << "wrote outside its rows, " << r.how << ": t=" << t << " n=" << n;
        continue;
      }
      double sum = 0, partial_sq = 0, abs_sum = 0, abs_used = 0, w_max = 0, m = 0, block = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (k % 32 == 0) block = std::fabs(sum);
        const double product = xb[k] * used[n * K + k];
        sum += product;
        partial_sq += sum * sum;
        block += std::fabs(product);
        m = std::max(m, block);
        abs_sum += std::fabs(static_cast<double>(x[t * K + k]) * W.real[n * K + k]);
        abs_used += std::fabs(product);
        w_max = std::max(w_max, std::fabs(static_cast<double>(W.real[n * K + k])));
      }
      const double tol = (parts == 1 ? 8 * kU * std::sqrt(partial_sq / 3)
                                     : 8 * kU * m * std::sqrt(roundings / 3)) +
                         x_rel * abs_used + 1e-30;
      const double ref_tol =
          precision == AmxPrecision::kExact
              ? 1e-5 * (1 + std::sqrt(static_cast<double>(K))) * x_max * w_max
              : abs_sum * ((parts == 1 ? kBf16Rel : kBf16x2Rel) + weight_rounding + 2 * K * kU);
      for (const Result& r : results) {
        const float value = r.y[t * ldy + n];
        ASSERT_NEAR(value, sum, tol)
            << "vs exact products, " << Name(precision) << ", " << r.how << ": T=" << T
            << " K=" << K << " rows [" << r0 << "," << r1 << ") t=" << t << " n=" << n;
        ASSERT_NEAR(value, ref[t * ldy + n], ref_tol)
            << "vs the fp32 reference kernel, " << Name(precision) << ", " << r.how << ": T=" << T
            << " K=" << K << " t=" << t << " n=" << n;
      }
    }
  }
}

class AmxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!ops::AmxUsable())
      GTEST_SKIP() << "AMX is not usable here (CPU without AMX-TILE/BF16/INT8, or the OS did "
                      "not grant the tile state): see the log line above";
  }
};

// Every token count 1-100 crosses each tail of the token tiles (1-15 spare rows, one or two
// tiles per kernel call); K = 100 ends inside a 32-wide block, K = 96 on one; rows [3, 45) of
// 50 start and end inside 16-row panels and leave a single panel at the end of a pair.
TEST_F(AmxTest, Bf16EveryTokenCountMatchesExactProducts) {
  for (AmxPrecision precision : kAllPrecisions) {
    for (int64_t K : {96, 100}) {
      const TestMatrix W = MakeBf16(50, K, 1 + K);
      for (int64_t T = 1; T <= 100; ++T) {
        CheckAmx(W, T, 3, 45, 50, 1000 * K + T, precision);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_F(AmxTest, Bf16ShortAndOddK) {
  for (AmxPrecision precision : kAllPrecisions) {
    // K below one block, one value past a block, and two blocks less one.
    for (int64_t K : {1, 7, 31, 33, 63}) {
      const TestMatrix W = MakeBf16(37, K, K);
      for (int64_t T : {1, 15, 16, 17, 33}) {
        CheckAmx(W, T, 0, 37, 40, 77 * K + T, precision);   // ldy > N: the padding is untouched
        CheckAmx(W, T, 17, 18, 37, 78 * K + T, precision);  // a single row inside a panel
        if (HasFatalFailure()) return;
      }
    }
  }
}

// A prompt chunk at the model's size: 512 tokens, K = 2048 (the hidden size of DeepSeekMoE
// 16B), more than one block of 8 packed panels (128 rows), a range ending mid-panel.
TEST_F(AmxTest, Bf16PromptChunk) {
  const TestMatrix W = MakeBf16(150, 2048, 5);
  CheckAmx(W, 512, 5, 147, 150, 6, AmxPrecision::kExact);
  CheckAmx(W, 512, 5, 147, 150, 6, AmxPrecision::kBf16);
}

// Random shapes and ranges, the way threads split a matrix.
TEST_F(AmxTest, Bf16RandomShapes) {
  std::mt19937 rng(42);
  for (int trial = 0; trial < 60; ++trial) {
    const int64_t T = 1 + rng() % 70, N = 1 + rng() % 90, K = 1 + rng() % 300;
    const int64_t r0 = rng() % N, r1 = r0 + 1 + rng() % (N - r0);
    const TestMatrix W = MakeBf16(N, K, 300 + trial);
    CheckAmx(W, T, r0, r1, N, 400 + trial, kAllPrecisions[trial % 3]);
    if (HasFatalFailure()) return;
  }
}

// The exact mode's tolerances must be able to fail: the fast mode's products (activations
// rounded to BF16) are caught by them, at the model's K and at a short one.
TEST_F(AmxTest, ExactToleranceRejectsBf16Rounding) {
  for (int64_t K : {64, 2048}) {
    for (const bool q8 : {false, true}) {
      const int64_t T = 16, N = 16;
      const TestMatrix W = q8 ? MakeQ8(N, K, 11 + K) : MakeBf16(N, K, 11 + K);
      const std::vector<float> x = RandomFloats(T * K, 12 + K, 2.0f);
      std::vector<float> exact(T * N), fast(T * N), ref(T * N);
      ops::AmxMatMulRows(x.data(), T, W.view, 0, N, exact.data(), N, AmxPrecision::kExact);
      ops::AmxMatMulRows(x.data(), T, W.view, 0, N, fast.data(), N, AmxPrecision::kBf16);
      ops::ReferenceKernels().matmul_rows(x.data(), T, W.view, 0, N, ref.data(), N);
      int64_t fast_outside = 0, exact_outside = 0;
      for (int64_t i = 0; i < T * N; ++i) {
        double x_max = 0, w_max = 0;
        for (int64_t k = 0; k < K; ++k) {
          x_max = std::max(x_max, std::fabs(static_cast<double>(x[i / N * K + k])));
          w_max = std::max(w_max, std::fabs(static_cast<double>(W.real[i % N * K + k])));
        }
        const double tol = 1e-5 * (1 + std::sqrt(static_cast<double>(K))) * x_max * w_max;
        fast_outside += std::fabs(fast[i] - ref[i]) > tol ? 1 : 0;
        exact_outside += std::fabs(exact[i] - ref[i]) > tol ? 1 : 0;
      }
      EXPECT_GT(fast_outside, T * N / 4) << "K=" << K << " q8=" << q8;
      EXPECT_EQ(exact_outside, 0) << "K=" << K << " q8=" << q8;
    }
  }
}

// The split's edges, one activation per token (the rest zeros) times weights that are powers of
// two, so that each product is exact in fp32 and the expected y is worked out by hand. Odd K
// (45) and T = 17: the values sit in a partial block and a second token tile.
TEST_F(AmxTest, ExactModeEdgeValues) {
  const float kMax = std::numeric_limits<float>::max();
  const float kInf = std::numeric_limits<float>::infinity();
  auto from_bits = [](uint32_t bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  };
  struct Case {
    const char* what;
    float x, w, want;
    float slack;  // |y - want| allowed (0: exact)
  };
  const float full = from_bits(0x3f800001);  // 1 + 2^-23: 24 significant bits
  const float ldexp_full_103 = std::ldexp(full, -103), ldexp_full_110 = std::ldexp(full, -110);
  const Case cases[] = {
      {"24-bit significand", full, 1.0f, full, 0},
      {"24-bit significand, negative", -from_bits(0x3fffffff), 4.0f, -4 * from_bits(0x3fffffff), 0},
      {"random-looking value", 1.2345678f, -0.5f, -0.5f * 1.2345678f, 0},
      // Round to nearest would make hi inf (and hi + mid overflow): truncation does not.
      {"FLT_MAX times 1/2", kMax, 0.5f, kMax / 2, 0},
      {"-FLT_MAX times 1", -kMax, 1.0f, -kMax, 0},
      {"FLT_MAX times 2 overflows, as in fp32", kMax, 2.0f, kInf, 0},
      {"+inf times -1", kInf, -1.0f, -kInf, 0},
      // Every part normal: |x| ≥ 2^-103 leaves lo ≥ 2^-126 (BF16's smallest normal).
      {"2^-103 (1 + 2^-23)", ldexp_full_103, 4.0f, 4 * ldexp_full_103, 0},
      // lo = 2^-133 is a BF16 denormal, read as zero: documented loss under 2^-125.
      {"2^-110 (1 + 2^-23): lo lost", ldexp_full_110, 1.0f, ldexp_full_110, std::ldexp(1.0f, -125)},
      {"fp32 denormal counts as zero", from_bits(0x00000123), 1.0f, 0.0f, 0},
  };
  const int64_t num_cases = sizeof(cases) / sizeof(cases[0]);
  const int64_t T = 17, N = 3, K = 45;
  std::vector<uint16_t> w(N * K);
  std::vector<float> x(T * K, 0.0f);
  for (int64_t t = 0; t < T; ++t) {
    const Case& c = cases[t % num_cases];
    const int64_t k = (7 * t + 40) % K;
    x[t * K + k] = c.x;
    for (int64_t n = 0; n < N; ++n) w[n * K + k] = F32ToBf16(c.w * (n + 1 == 3 ? 4.0f : n + 1));
  }
  // One matrix serves all tokens only if no two tokens share a k with different weights.
  for (int64_t t = 0; t < T; ++t)
    for (int64_t u = 0; u < t; ++u)
      ASSERT_FALSE((7 * t + 40) % K == (7 * u + 40) % K &&
                   cases[t % num_cases].w != cases[u % num_cases].w);
  const MatrixView W{DType::kBF16, N, K, w.data()};
  // Each check in both orientations: x converted by the call (token tiles), and x packed as B
  // tiles for the transposed product (weight tiles).
  auto multiply = [](const std::vector<float>& xs, int64_t tokens, const MatrixView& m, float* out,
                     ops::AmxLayout layout) {
    if (layout == ops::AmxLayout::kTokenTiles) {
      ops::AmxMatMulRows(xs.data(), tokens, m, 0, m.rows, out, m.rows, AmxPrecision::kExact);
      return;
    }
    std::vector<uint16_t> packed(ops::AmxPackedActivationsSize(tokens, m.cols));
    ops::AmxPackActivations(xs.data(), tokens, m.cols, packed.data(), AmxPrecision::kExact, layout);
    ops::AmxMatMulRowsPacked(packed.data(), tokens, m, 0, m.rows, out, m.rows, AmxPrecision::kExact,
                             layout);
  };
  for (const ops::AmxLayout layout : {ops::AmxLayout::kTokenTiles, ops::AmxLayout::kWeightTiles}) {
    SCOPED_TRACE(layout == ops::AmxLayout::kTokenTiles ? "token tiles" : "weight tiles");
    std::vector<float> y(T * N, -1.0f);
    multiply(x, T, W, y.data(), layout);
    for (int64_t t = 0; t < T; ++t) {
      const Case& c = cases[t % num_cases];
      for (int64_t n = 0; n < N; ++n) {
        const float scale = n + 1 == 3 ? 4.0f : static_cast<float>(n + 1);
        const float want = c.want * scale, got = y[t * N + n];
        if (c.slack == 0)
          EXPECT_EQ(got, want) << c.what << ", weight scale " << scale;
        else
          EXPECT_NEAR(got, want, c.slack * scale) << c.what << ", weight scale " << scale;
      }
    }
    // NaN stays NaN, also one whose payload is only in the low 16 bits (truncated, it would be
    // inf), and so does an inf times a zero weight.
    std::vector<float> xn(16 * K, 0.0f), yn(16 * N, 0.0f);
    xn[0] = from_bits(0x7f800001);
    xn[K + 3] = from_bits(0xffc00000);
    std::vector<uint16_t> wn(N * K, F32ToBf16(1.0f));
    wn[2 * K + 5] = 0;
    xn[2 * K + 5] = kInf;
    multiply(xn, 16, MatrixView{DType::kBF16, N, K, wn.data()}, yn.data(), layout);
    for (int64_t n = 0; n < N; ++n) {
      EXPECT_TRUE(std::isnan(yn[n])) << n;
      EXPECT_TRUE(std::isnan(yn[N + n])) << n;
    }
    EXPECT_EQ(yn[2 * N + 0], kInf);
    EXPECT_TRUE(std::isnan(yn[2 * N + 2]));
    for (int64_t i = 3 * N; i < 16 * N; ++i) EXPECT_EQ(yn[i], 0.0f) << i;
  }
}

// Q8_0: in the fast mode the weights are dequantized to BF16 as the panels are packed, in the
// others q is multiplied and each block scaled by d after. Every token count 1-100 over a range
// inside 16-row panels, K of one and of several Q8_0 blocks (odd and even counts of them), and
// a prompt chunk at the model's size.
TEST_F(AmxTest, Q8EveryTokenCountMatchesExactProducts) {
  for (AmxPrecision precision : kAllPrecisions) {
    for (int64_t K : {32, 160}) {
      const TestMatrix W = MakeQ8(50, K, 2 + K);
      for (int64_t T = 1; T <= 100; ++T) {
        CheckAmx(W, T, 3, 45, 50, 2000 * K + T, precision);
        if (HasFatalFailure()) return;
      }
    }
  }
}

TEST_F(AmxTest, Q8PromptChunk) {
  const TestMatrix W = MakeQ8(150, 1408, 7);
  CheckAmx(W, 512, 9, 141, 150, 8, AmxPrecision::kExact);
  CheckAmx(W, 512, 9, 141, 150, 8, AmxPrecision::kBf16);
}

TEST_F(AmxTest, Q8RandomShapes) {
  std::mt19937 rng(43);
  for (int trial = 0; trial < 30; ++trial) {
    const int64_t T = 1 + rng() % 70, N = 1 + rng() % 90, K = 32 * (1 + rng() % 9);
    const int64_t r0 = rng() % N, r1 = r0 + 1 + rng() % (N - r0);
    const TestMatrix W = MakeQ8(N, K, 500 + trial);
    CheckAmx(W, T, r0, r1, N + trial % 3, 600 + trial, kAllPrecisions[trial % 3]);
    if (HasFatalFailure()) return;
  }
}

// Q8_0 rows are whole blocks of 32; a matrix that is not is refused (y left as it was), not read
// past its scales.
TEST_F(AmxTest, Q8RefusesPartialBlocks) {
  std::vector<int8_t> q(4 * 40, 1);
  std::vector<uint16_t> scales(4 * 2, F32ToF16(1.0f));
  const MatrixView W{DType::kQ8_0, 4, 40, q.data(), scales.data()};
  std::vector<float> x(16 * 40, 1.0f), y(16 * 4, -3.0f);
  for (AmxPrecision precision : kAllPrecisions)
    ops::AmxMatMulRows(x.data(), 16, W, 0, 4, y.data(), 4, precision);
  for (float v : y) EXPECT_EQ(v, -3.0f);
}

// The check above must be able to fail: a single wrong weight is caught.
TEST_F(AmxTest, CheckDetectsAWrongWeight) {
  TestMatrix W = MakeBf16(20, 64, 9);
  const std::vector<float> x = RandomFloats(16 * 64, 10, 2.0f);
  std::vector<float> y(16 * 20), y2(16 * 20);
  ops::AmxMatMulRows(x.data(), 16, W.view, 0, 20, y.data(), 20);
  W.bytes[2 * (5 * 64 + 40) + 1] ^= 0x40;  // flip an exponent bit of W[5, 40]
  ops::AmxMatMulRows(x.data(), 16, W.view, 0, 20, y2.data(), 20);  // exact mode, the default
  for (int64_t t = 0; t < 16; ++t) {
    for (int64_t n = 0; n < 20; ++n) {
      if (n == 5)
        EXPECT_NE(y[t * 20 + n], y2[t * 20 + n]) << t;
      else
        EXPECT_EQ(y[t * 20 + n], y2[t * 20 + n]) << t << " " << n;
    }
  }
}

// The transposed orientation multiplies Q8_0's q and scales each block in fp32 at every
// precision: at kBf16 its weights are exact (only x is rounded to BF16), where the other
// orientation rounds q · d to BF16 as it packs. Against Σ bf16(x)·(q·d) in double, to a bound
// (1e-6 of Σ|products|) that the other orientation's rounded weights exceed.
TEST_F(AmxTest, WeightTilesQ8FastModeMultipliesExactWeights) {
  const int64_t N = 20, K = 64;
  const TestMatrix W = MakeQ8(N, K, 17);
  for (int64_t T : {16, 33}) {
    const std::vector<float> x = RandomFloats(T * K, 18 + T, 2.0f);
    std::vector<uint16_t> packed(ops::AmxPackedActivationsSize(T, K, AmxPrecision::kBf16));
    ops::AmxPackActivations(x.data(), T, K, packed.data(), AmxPrecision::kBf16,
                            ops::AmxLayout::kWeightTiles);
    std::vector<float> y(T * N), rounded(T * N);
    ops::AmxMatMulRowsPacked(packed.data(), T, W.view, 0, N, y.data(), N, AmxPrecision::kBf16,
                             ops::AmxLayout::kWeightTiles);
    ops::AmxMatMulRows(x.data(), T, W.view, 0, N, rounded.data(), N, AmxPrecision::kBf16);
    int64_t rounded_outside = 0;
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t n = 0; n < N; ++n) {
        double sum = 0, abs_sum = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double p =
              Bf16ToF32(F32ToBf16(x[t * K + k])) * static_cast<double>(W.real[n * K + k]);
          sum += p;
          abs_sum += std::fabs(p);
        }
        const double tol = 1e-6 * abs_sum;
        ASSERT_NEAR(y[t * N + n], sum, tol) << "T=" << T << " t=" << t << " n=" << n;
        rounded_outside += std::fabs(rounded[t * N + n] - sum) > tol ? 1 : 0;
      }
    }
    EXPECT_GT(rounded_outside, T * N / 2) << "T=" << T;
  }
}

// Only the amx table prepares activations, and only where its matmul_rows would use AMX (16
// tokens or more, BF16 and Q8_0): everywhere else ops::Linear and RunMlps call matmul_rows as
// before (decode included).
TEST_F(AmxTest, OnlyTheAmxTablePreparesAndOnlyForBatches) {
  EXPECT_EQ(ops::ReferenceKernels().prepared_size, nullptr);
  if (const ops::KernelTable* avx512 = ops::Avx512Kernels()) {
    EXPECT_EQ(avx512->prepared_size, nullptr);
    EXPECT_EQ(avx512->prepare, nullptr);
    EXPECT_EQ(avx512->matmul_rows_prepared, nullptr);
  }
  const ops::KernelTable& amx = *ops::Avx512AmxKernels();
  ASSERT_NE(amx.prepared_size, nullptr);
  ASSERT_NE(amx.prepare, nullptr);
  ASSERT_NE(amx.matmul_rows_prepared, nullptr);
  for (const DType dtype : {DType::kBF16, DType::kQ8_0}) {
    EXPECT_EQ(amx.prepared_size(1, 64, dtype), 0);
    EXPECT_EQ(amx.prepared_size(15, 64, dtype), 0);
    // 16 and 17 tokens: one and two tiles of 16 tokens × 2 blocks × 3 parts of 1 KiB.
    EXPECT_EQ(amx.prepared_size(16, 64, dtype), 6 * 1024);
    EXPECT_EQ(amx.prepared_size(17, 64, dtype), 12 * 1024);
  }
  for (const DType dtype : {DType::kF32, DType::kF16})
    EXPECT_EQ(amx.prepared_size(64, 64, dtype), 0);
}

// The fp32 kernels' bound for one product y[t, n] of x [T, K] and W (kernels_test gives AVX2
// against the reference 1e-5·(1 + sqrt(K)) on values within ±1), scaled to the largest
// magnitudes of the token's x and the row's weights.
double ExactBound(const std::vector<float>& x, const TestMatrix& W, int64_t t, int64_t n) {
  const int64_t K = W.view.cols;
  double x_max = 0, w_max = 0;
  for (int64_t k = 0; k < K; ++k) {
    x_max = std::max(x_max, std::fabs(static_cast<double>(x[t * K + k])));
    w_max = std::max(w_max, std::fabs(static_cast<double>(W.real[n * K + k])));
  }
  return 1e-5 * (1 + std::sqrt(static_cast<double>(K))) * x_max * w_max;
}

// ops::Linear with the amx table (x prepared once per matrix from 16 tokens on, the rows in
// 8 chunks per thread) against ops::Linear with the reference table: within the exact bound,
// on token counts that cross the preparation's threshold and its 32-token slices, BF16 with K
// off the 32-wide blocks and Q8_0, a bias, and rows not a multiple of 16.
TEST_F(AmxTest, LinearWithTheAmxTableMatchesTheReferenceTable) {
  ThreadPool pool(2);
  const ops::KernelTable& amx = *ops::Avx512AmxKernels();
  for (const bool q8 : {false, true}) {
    const int64_t K = q8 ? 160 : 100, N = 70;
    const TestMatrix W = q8 ? MakeQ8(N, K, 21) : MakeBf16(N, K, 22);
    const std::vector<float> bias = RandomFloats(N, 23);
    for (int64_t T : {1, 15, 16, 17, 31, 33, 48, 49, 100, 260}) {
      const std::vector<float> x = RandomFloats(T * K, 24 + T, 2.0f);
      std::vector<float> y(T * N, -1.0f), ref(T * N, -2.0f);
      ops::Linear(pool, amx, x.data(), T, W.view, bias.data(), y.data());
      ops::Linear(pool, ops::ReferenceKernels(), x.data(), T, W.view, bias.data(), ref.data());
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t n = 0; n < N; ++n) {
          // Both add the bias in fp32 after the product: one more rounding, ≤ 2^-24·|y| each.
          const double tol = ExactBound(x, W, t, n) + 2 * kU * std::fabs(ref[t * N + n]);
          ASSERT_NEAR(y[t * N + n], ref[t * N + n], tol)
              << (q8 ? "Q8_0" : "BF16") << " T=" << T << " t=" << t << " n=" << n;
        }
      }
    }
  }
}

// RunMlps with the amx table (each job's x prepared once for gate and up, act once for down)
// against RunMlps with the reference table. Jobs of BF16 and Q8_0 weights and different widths
// (not multiples of 16) in one call, token counts below the threshold (the table's matmul_rows)
// and above it. The bounds: gate and up within the exact bound Δg, Δu of their products, so
// act = silu(g)·u within 1.1·Δg·(|u| + Δu) + |silu(g)|·Δu (silu' ≤ 1.1) plus the two silu
// kernels' difference (2e-6 relative, kernels_test's bound for each against double); out then
// within Σ_k Δact_k·|down[n, k]| plus the exact bound of its own product.
TEST_F(AmxTest, RunMlpsWithTheAmxTableMatchesTheReferenceTable) {
  ThreadPool pool(2);
  const ops::KernelTable& amx = *ops::Avx512AmxKernels();
  const int64_t H = 64;
  struct Expert {
    TestMatrix gate, up, down;
    MlpWeights mlp;
  };
  std::vector<Expert> experts(4);
  const int64_t widths[] = {40, 96, 24, 64};
  for (int e = 0; e < 4; ++e) {
    const int64_t F = widths[e];
    const bool q8 = e % 2 == 1;  // Q8_0 needs widths of whole blocks: 96, 64
    Expert& x = experts[e];
    x.gate = q8 ? MakeQ8(F, H, 30 + e) : MakeBf16(F, H, 30 + e);
    x.up = q8 ? MakeQ8(F, H, 40 + e) : MakeBf16(F, H, 40 + e);
    x.down = q8 ? MakeQ8(H, F, 50 + e) : MakeBf16(H, F, 50 + e);
    x.mlp = MlpWeights{x.gate.view, x.up.view, x.down.view};
  }
  for (const std::vector<int64_t>& counts :
       std::vector<std::vector<int64_t>>{{48, 5, 16, 33}, {1, 100, 17, 15}, {64, 64, 64, 64}}) {
    struct Buffers {
      std::vector<float> x, act, up, out;
    };
    std::vector<Buffers> amx_buf(4), ref_buf(4);
    std::vector<MlpJob> amx_jobs, ref_jobs;
    for (int e = 0; e < 4; ++e) {
      const int64_t n = counts[e], F = widths[e];
      for (auto* b : {&amx_buf[e], &ref_buf[e]}) {
        b->x = RandomFloats(n * H, 60 + e + n, 2.0f);
        b->act.assign(n * F, 0.0f);
        b->up.assign(n * F, 0.0f);
        b->out.assign(n * H, -1.0f);
      }
      amx_jobs.push_back({&experts[e].mlp, amx_buf[e].x.data(), n, amx_buf[e].act.data(),
                          amx_buf[e].up.data(), amx_buf[e].out.data()});
      ref_jobs.push_back({&experts[e].mlp, ref_buf[e].x.data(), n, ref_buf[e].act.data(),
                          ref_buf[e].up.data(), ref_buf[e].out.data()});
    }
    RunMlps(pool, amx, amx_jobs.data(), 4, H);
    RunMlps(pool, ops::ReferenceKernels(), ref_jobs.data(), 4, H);
    for (int e = 0; e < 4; ++e) {
      const Expert& ex = experts[e];
      const int64_t n = counts[e], F = widths[e];
      const std::vector<float>& x = ref_buf[e].x;
      std::vector<double> act_tol(n * F);
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t f = 0; f < F; ++f) {
          double g = 0, u = 0;
          for (int64_t k = 0; k < H; ++k) {
            g += static_cast<double>(x[t * H + k]) * ex.gate.real[f * H + k];
            u += static_cast<double>(x[t * H + k]) * ex.up.real[f * H + k];
          }
          const double dg = ExactBound(x, ex.gate, t, f), du = ExactBound(x, ex.up, t, f);
          const double silu = g / (1 + std::exp(-g));
          const double want = ref_buf[e].act[t * F + f];
          act_tol[t * F + f] = 1.1 * dg * (std::fabs(u) + du) + (std::fabs(silu) + 1.1 * dg) * du +
                               4e-6 * (std::fabs(want) + 1e-3);
          ASSERT_NEAR(amx_buf[e].act[t * F + f], want, act_tol[t * F + f])
              << "act, expert " << e << " n=" << n << " t=" << t << " f=" << f;
        }
      }
      for (int64_t t = 0; t < n; ++t) {
        for (int64_t h = 0; h < H; ++h) {
          double propagated = 0;
          for (int64_t f = 0; f < F; ++f)
            propagated += act_tol[t * F + f] * std::fabs(ex.down.real[h * F + f]);
          const double tol = propagated + ExactBound(ref_buf[e].act, ex.down, t, h);
          ASSERT_NEAR(amx_buf[e].out[t * H + h], ref_buf[e].out[t * H + h], tol)
              << "out, expert " << e << " n=" << n << " t=" << t << " h=" << h;
        }
      }
    }
  }
}

// What Linux says about the CPU, independently of CPUID: /proc/cpuinfo lists amx_tile,
// amx_bf16 and amx_int8 only where the CPU has them and the kernel supports the tile state.
TEST(AmxUsableTest, AgreesWithProcCpuinfo) {
  std::ifstream cpuinfo("/proc/cpuinfo");
  if (!cpuinfo) GTEST_SKIP() << "no /proc/cpuinfo (not Linux)";
  std::string line;
  bool tile = false, bf16 = false, int8 = false;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("flags", 0) != 0) continue;
    std::istringstream flags(line.substr(line.find(':') + 1));
    for (std::string flag; flags >> flag;) {
      tile |= flag == "amx_tile";
      bf16 |= flag == "amx_bf16";
      int8 |= flag == "amx_int8";
    }
    break;
  }
  EXPECT_EQ(ops::AmxUsable(), tile && bf16 && int8)
      << "cpuinfo: amx_tile=" << tile << " amx_bf16=" << bf16 << " amx_int8=" << int8;
}

// Probed once: threads asking at the same time all get the one answer.
TEST(AmxUsableTest, SameAnswerOnEveryThread) {
  const bool want = ops::AmxUsable();
  std::vector<std::thread> threads;
  std::atomic<int> disagree{0};
  for (int i = 0; i < 4; ++i)
    threads.emplace_back([&] { disagree += ops::AmxUsable() != want ? 1 : 0; });
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(disagree.load(), 0);
}

TEST(AmxSupportTest, Bf16AndQ8Only) {
  for (AmxPrecision precision : kAllPrecisions) {
    EXPECT_TRUE(ops::AmxSupports(DType::kBF16, precision) || !ops::AmxUsable()) << Name(precision);
    EXPECT_TRUE(ops::AmxSupports(DType::kQ8_0, precision) || !ops::AmxUsable()) << Name(precision);
    EXPECT_FALSE(ops::AmxSupports(DType::kF16, precision));
    EXPECT_FALSE(ops::AmxSupports(DType::kF32, precision));
    EXPECT_FALSE(ops::AmxSupports(DType::kI8, precision));
  }
  EXPECT_FALSE(ops::AmxSupports(DType::kF32, static_cast<AmxPrecision>(4)));
  EXPECT_FALSE(ops::AmxSupports(DType::kBF16, static_cast<AmxPrecision>(0)));
}

}  // namespace
}  // namespace dsmoe
